"""Checkpoint I/O: lazy reads, corrupt files named, pickle refused by default, sharded deterministic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergegate import Checkpoint, CheckpointError
from mergegate.checkpoint import OutputTensor, ShardedWriter, parse_size


def test_reads_each_tensor_equal_to_safetensors(family):
    ck = Checkpoint(family["base"])
    assert ck.architecture == "llama/LlamaForCausalLM" and ck.num_layers() == 2
    with safe_open(ck.weight_files[0], framework="pt") as fh:
        for name in fh.keys():
            assert torch.equal(ck.read(name), fh.get_tensor(name)), name
    assert {p.name for p in ck.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}
    assert len(ck.vocabulary()) > 50


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder.*never downloads"):
        Checkpoint(tmp_path / "org/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path / "empty")


def test_truncated_safetensors_names_file_and_tensor(family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(family["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' .* truncated or corrupt"):
        Checkpoint(broken)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint(broken)


def _pickle_copy(family, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(family["base"], folder)
    ck = Checkpoint(folder)
    state = {name: ck.read(name).clone() for name in ck.tensors}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder, state


def test_pickle_weights_are_refused_unless_allowed(family, tmp_path):
    folder, state = _pickle_copy(family, tmp_path)
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        Checkpoint(folder)
    ck = Checkpoint(folder, allow_pickle=True)
    assert set(ck.tensors) == set(state)
    assert all(torch.equal(ck.read(name), tensor) for name, tensor in state.items())


def test_sharded_writer_layout_index_and_round_trip(tmp_path):
    tensors = {f"model.layers.{i}.w": torch.randn(64, 32).to(torch.bfloat16) for i in (10, 2, 0)}
    tensors["lm_head.weight"] = torch.randn(16, 32)
    outputs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, outputs, shard_size=2 * 64 * 32 * 2)
    for name in ["model.layers.2.w", "lm_head.weight", "model.layers.0.w", "model.layers.10.w"]:
        writer.write(name, tensors[name])  # any order
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == ["lm_head.weight", "model.layers.0.w", "model.layers.2.w",
                                         "model.layers.10.w"]
    assert len(set(index["weight_map"].values())) == 2
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, framework="pt") as fh:
            assert torch.equal(fh.get_tensor(name), tensors[name])


def test_writer_close_refuses_missing_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [OutputTensor("a", torch.float32, (2,))], shard_size=10**9)
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1.5G") == 15 * 10**8
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_header_rejects_unknown_dtype(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"x": torch.zeros(2)}, folder / "model.safetensors")
    raw = (folder / "model.safetensors").read_bytes().replace(b'"F32"', b'"X32"')
    (folder / "model.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match="tensor 'x' has unsupported dtype 'X32'"):
        Checkpoint(folder)
