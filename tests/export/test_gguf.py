"""GGUF export of the shipped demo base: read back with the `gguf` package's reader, every tensor within its
format's error of the source, llama.cpp's names, shapes, rope order and metadata, the tokenizer, refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ..helpers import assert_refused

gguf = pytest.importorskip("gguf")

from mergegate.cli import app  # noqa: E402
from mergegate.errors import GGUFExportError  # noqa: E402
from mergegate.export.gguf import (  # noqa: E402
    block_error_bound,
    dequantized_tensors,
    export_gguf,
    permute_rope_rows,
    unpermute_rope_rows,
)
from mergegate.io.read import Checkpoint  # noqa: E402

BASE = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models" / "base"
HEADS, KV_HEADS, LAYERS = 4, 4, 4
F16_EPS = 2.0 ** -11  # float16's unit roundoff: half a unit in the last place, relative


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {qtype: export_gguf(BASE, out / f"base-{qtype}.gguf", qtype).path for qtype in ("f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def source() -> dict[str, np.ndarray]:
    checkpoint = Checkpoint(BASE)
    return {name: checkpoint.read(name).float().numpy() for name in checkpoint.tensors}


def _source_in_gguf_order(source: dict[str, np.ndarray], gguf_name: str) -> np.ndarray:
    """The source tensor a GGUF tensor was made from, its q/k rows permuted as the exporter does."""
    hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}.get(gguf_name.rsplit(".", 1)[0])
    if hf is None:
        layer, part = gguf_name.split(".")[1], gguf_name.split(".")[2]
        hf = f"model.layers.{layer}." + {
            "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[part]
    array = source[hf + ".weight"]
    if ".attn_q." in gguf_name:
        return permute_rope_rows(array, HEADS)
    if ".attn_k." in gguf_name:
        return permute_rope_rows(array, KV_HEADS)
    return array


def test_names_and_shapes_are_llama_cpps(exported, source):
    tensors = dequantized_tensors(exported["f16"])
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(LAYERS) for part in per_layer}
    assert set(tensors) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    reader = gguf.GGUFReader(exported["f16"])
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: fastest dimension first
    assert shapes["token_embd.weight"] == [128, 95]  # {n_embd, n_vocab}
    assert shapes["blk.0.ffn_gate.weight"] == [128, 512] and shapes["blk.0.ffn_down.weight"] == [512, 128]
    assert shapes["blk.3.attn_q.weight"] == [128, 128] and shapes["output_norm.weight"] == [128]
    for name, (_, array) in tensors.items():
        assert array.shape == _source_in_gguf_order(source, name).shape, name


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_every_tensor_dequantizes_within_the_formats_error(exported, source, qtype):
    matrices = 0
    for name, (ggml_type, array) in dequantized_tensors(exported[qtype]).items():
        original = _source_in_gguf_order(source, name)
        if original.ndim == 1:  # norms stay float32: bit-exact
            assert ggml_type == "F32" and np.array_equal(array, original), name
            continue
        matrices += 1
        error = np.abs(array - original)
        if qtype == "f16":
            assert ggml_type == "F16"
            assert np.array_equal(array, original.astype(np.float16).astype(np.float32)), name
            assert np.all(error <= np.abs(original) * F16_EPS + 2.0 ** -25), name  # 2⁻²⁵: half the smallest subnormal
        else:
            assert ggml_type == qtype.upper(), name
            bound = block_error_bound(original, qtype)
            assert np.all(error <= bound), (name, float((error - bound).max()))
            # and the bound is not vacuous: the error is a real fraction of it, not zero
            assert 0 < error.mean() < bound.mean(), name
    assert matrices == 1 + LAYERS * 7


def test_quantized_files_are_smaller_in_the_formats_ratio(exported):
    sizes = {qtype: path.stat().st_size for qtype, path in exported.items()}
    # per 32 values: F16 64 bytes, Q8_0 34, Q4_0 18 (norms and metadata alike in all three)
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    assert 0.45 < sizes["q8_0"] / sizes["f16"] < 0.6 and 0.25 < sizes["q4_0"] / sizes["f16"] < 0.35


def test_q_and_k_rows_are_in_llama_cpps_rope_order(exported, source):
    """Rotate-half rope on Hugging Face's rows equals interleaved-pair rope (llama.cpp's) on the exported rows."""
    q_gguf = dequantized_tensors(exported["f16"])["blk.1.attn_q.weight"][1]
    q_hf = source["model.layers.1.self_attn.q_proj.weight"].astype(np.float16).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(q_gguf, HEADS), q_hf)
    head_dim, position = 32, 7
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    angles = position * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles), np.sin(angles)

    def rotate_half(vec):  # transformers' llama: pairs (i, i + d/2)
        a, b = vec[: head_dim // 2], vec[head_dim // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    def rotate_pairs(vec):  # ggml's normal rope: pairs (2i, 2i + 1)
        out = vec.copy()
        out[0::2], out[1::2] = vec[0::2] * cos - vec[1::2] * sin, vec[1::2] * cos + vec[0::2] * sin
        return out

    hf_heads = (q_hf @ x).reshape(HEADS, head_dim)
    gguf_heads = (q_gguf @ x).reshape(HEADS, head_dim)
    for head in range(HEADS):
        expected = permute_rope_rows(rotate_half(hf_heads[head]), 1)
        assert np.allclose(rotate_pairs(gguf_heads[head]), expected, atol=1e-5)


def test_metadata_holds_the_hyperparameters_tokenizer_and_chat_template(exported):
    config = json.loads((BASE / "config.json").read_text())
    fields = gguf.GGUFReader(exported["q8_0"]).fields
    value = {name: field.contents() for name, field in fields.items()}
    assert value["general.architecture"] == "llama"
    assert value["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert value["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert value["llama.context_length"] == config["max_position_embeddings"] == 256
    assert value["llama.embedding_length"] == 128 and value["llama.block_count"] == LAYERS
    assert value["llama.feed_forward_length"] == 512
    assert value["llama.attention.head_count"] == HEADS and value["llama.attention.head_count_kv"] == KV_HEADS
    assert value["llama.rope.freq_base"] == 10000.0 and value["llama.rope.dimension_count"] == 32
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert value["llama.vocab_size"] == config["vocab_size"] == 95
    assert value["tokenizer.ggml.model"] == "llama" and value["tokenizer.ggml.add_space_prefix"] is False
    assert (value["tokenizer.ggml.bos_token_id"], value["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (value["tokenizer.ggml.unknown_token_id"], value["tokenizer.ggml.padding_token_id"]) == (0, 3)
    assert value["tokenizer.ggml.add_bos_token"] is True and value["tokenizer.ggml.add_eos_token"] is False
    assert value["tokenizer.chat_template"] == (BASE / "chat_template.jinja").read_text()
    tokens, types = value["tokenizer.ggml.tokens"], value["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(value["tokenizer.ggml.scores"]) == 95
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "<pad>", "\u2581"]  # the space spelled as SentencePiece does
    assert types[:5] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                         gguf.TokenType.CONTROL, gguf.TokenType.NORMAL]


def test_gguf_vocabulary_tokenizes_as_the_source_tokenizer(exported):
    """llama.cpp's SentencePiece tokenizer on a character vocabulary: spaces → ▁, one token per character (no pair
    of characters is a token), BOS first; the same ids the Hugging Face tokenizer gives."""
    from tokenizers import Tokenizer

    tokens = gguf.GGUFReader(exported["f16"]).fields["tokenizer.ggml.tokens"].contents()
    ids = {token: index for index, token in enumerate(tokens)}
    text = 'Call search("weather in Oslo") -> {"ok": 1}\nDone.'
    spm = [1] + [ids[char] for char in text.replace(" ", "\u2581")]
    assert spm == Tokenizer.from_file(str(BASE / "tokenizer.json")).encode(text).ids


def test_refuses_other_architectures_and_types_without_writing(tmp_path):
    mistral = tmp_path / "mistral"
    shutil.copytree(BASE, mistral)
    config = json.loads((mistral / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match="mistral/MistralForCausalLM is not exported to GGUF"):
        export_gguf(mistral, out)
    with pytest.raises(GGUFExportError, match="'q5_k' is not one of f16, q8_0, q4_0"):
        export_gguf(BASE, out, "q5_k")
    assert [p.name for p in tmp_path.iterdir()] == ["mistral"]
    assert_refused(CliRunner().invoke(app, ["export-gguf", str(mistral), str(out)]), "MistralForCausalLM")


def test_cli_replaces_an_existing_file_only_with_overwrite_and_atomically(tmp_path):
    out = tmp_path / "base.gguf"
    out.write_bytes(b"old")
    assert_refused(CliRunner().invoke(app, ["export-gguf", str(BASE), str(out)]), str(out), "exists", "--overwrite")
    assert out.read_bytes() == b"old"
    result = CliRunner().invoke(app, ["export-gguf", str(BASE), str(out), "--type", "q4_0", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "q4_0: 38 tensors as F32, Q4_0" in result.output
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert [p.name for p in tmp_path.iterdir()] == ["base.gguf"]  # no partial left beside it


def _variant(tmp_path: Path, config: dict | None = None, nan_in: str | None = None) -> Path:
    """A copy of the demo base with config.json fields replaced and/or a NaN in one tensor."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    if config:
        (folder / "config.json").write_text(json.dumps({**json.loads((BASE / "config.json").read_text()), **config}))
    if nan_in:
        tensors = load_file(folder / "model.safetensors")
        tensors[nan_in][0] = float("nan")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


LAST_TENSOR = "model.norm.weight"  # converted last: a refusal naming OUT instead came before any conversion


def _unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("where, fragment", [
    ("folder", "is a folder"),
    ("under a file", "is not a folder"),
    ("read-only folder", "not writable"),
    ("/sys", "cannot be written"),
])
def test_cli_refuses_an_unusable_out_before_converting_anything(tmp_path, where, fragment):
    model = _variant(tmp_path, nan_in=LAST_TENSOR)
    if where == "folder":
        out = tmp_path / "out.gguf"
        out.mkdir()
    elif where == "under a file":
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "sub" / "out.gguf"
    elif where == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0500 folder; the /sys case covers root")
        out = _unwritable_folder(tmp_path) / "out.gguf"
    else:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs")
        out = Path("/sys/kernel/mergegate-test.gguf")  # nobody, root included, creates files there
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_refused(CliRunner().invoke(app, ["export-gguf", str(model), str(out)]), str(out), fragment)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_refuses_nan_weights_naming_the_tensor_and_leaves_nothing(tmp_path):
    model = _variant(tmp_path, nan_in="model.layers.2.mlp.up_proj.weight")
    out = tmp_path / "new" / "out.gguf"
    assert_refused(CliRunner().invoke(app, ["export-gguf", str(model), str(out)]),
                   "'model.layers.2.mlp.up_proj.weight'", "NaN")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("config, fragments", [
    ({"num_attention_heads": 3}, ["'num_key_value_heads' is 4", "'num_attention_heads' 3"]),
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},
     ["'num_attention_heads' is 3", "'hidden_size' 128"]),
    ({"num_key_value_heads": 3}, ["'num_key_value_heads' is 3", "'num_attention_heads' 4"]),
    ({"head_dim": 31, "num_attention_heads": 4}, ["'head_dim' is 31"]),
    ({"head_dim": 16}, ["model.layers.0.self_attn.k_proj.weight", "128 rows", "num_key_value_heads × head dim is 4 × 16 = 64"]),
])
def test_cli_refuses_attention_shapes_that_do_not_fit_naming_the_field(tmp_path, config, fragments):
    model = _variant(tmp_path, config=config)
    out = tmp_path / "out.gguf"
    assert_refused(CliRunner().invoke(app, ["export-gguf", str(model), str(out)]), *fragments)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_partial_file_of_a_killed_export_is_removed_by_the_next(tmp_path):
    stale = tmp_path / ".base.gguf.mergegate-partial-999999999"  # no such pid: its writer is gone
    stale.write_bytes(b"half")
    export_gguf(BASE, tmp_path / "base.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["base.gguf"]


def _bpe_model(folder: Path, pre_tokenizer=None):
    """A one-layer Llama with a byte-level BPE tokenizer (`pre_tokenizer`: GPT-2's by default) written directly
    (transformers' import alone takes seconds); the tokenizer."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir()
    config = json.loads((BASE / "config.json").read_text())
    config.update(vocab_size=320, hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=1,
                  tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (320, 64), "lm_head.weight": (320, 64), "model.norm.weight": (64,)}
    for part, shape in {"input_layernorm": (64,), "post_attention_layernorm": (64,), "self_attn.q_proj": (64, 64),
                        "self_attn.k_proj": (64, 64), "self_attn.v_proj": (64, 64), "self_attn.o_proj": (64, 64),
                        "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128)}.items():
        shapes[f"model.layers.0.{part}.weight"] = shape
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["the weather in Oslo is cold", "search the weather"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def test_byte_level_bpe_untied_and_padded_vocabulary(tmp_path):
    """A byte-level BPE (GPT-2 style) becomes tokenizer.ggml.model "gpt2" with its merges; an untied lm_head
    becomes output.weight; embedding rows past the tokenizer are named [PADn] and typed UNUSED."""
    folder = tmp_path / "bpe"
    tokenizer = _bpe_model(folder)
    exported = export_gguf(folder, tmp_path / "bpe.gguf", "q8_0")
    assert exported.tokenizer_model == "gpt2" and exported.tensors["output.weight"] == ("lm_head.weight", "Q8_0")
    value = {name: field.contents() for name, field in gguf.GGUFReader(exported.path).fields.items()}
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert value["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = value["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and all(tokens[i] == text for text, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 320)]
    assert set(value["tokenizer.ggml.token_type"][len(vocab):]) == {gguf.TokenType.UNUSED}
    assert value["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL


def _gpt2_byte_level():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _digits_then_gpt2():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_byte_level()])


@pytest.mark.parametrize("pre_tokenizer, name", [(_gpt2_byte_level, "gpt-2"), (_digits_then_gpt2, "smollm")],
                         ids=["gpt-2", "digits-then-gpt-2"])
def test_a_byte_level_bpe_is_pre_split_by_llama_cpp_as_by_its_own_tokenizer(pre_tokenizer, name, tmp_path):
    # llama.cpp reads the pre-tokenization by name: its "default" splits " +" into " " and "+", which GPT-2's
    # regex (and SmolLM2's tokenizer) keep whole, so a prompt with a sum reached the model as other tokens
    _bpe_model(tmp_path / "bpe", pre_tokenizer())
    exported = export_gguf(tmp_path / "bpe", tmp_path / "bpe.gguf")
    assert gguf.GGUFReader(exported.path).fields["tokenizer.ggml.pre"].contents() == name


def test_a_byte_level_bpe_split_in_a_way_llama_cpp_has_no_name_for_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    _bpe_model(tmp_path / "bpe", pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), _gpt2_byte_level()]))
    with pytest.raises(GGUFExportError, match=r"tokenizer.json: its pre-tokenizer \(Punctuation, ByteLevel\)"):
        export_gguf(tmp_path / "bpe", tmp_path / "bpe.gguf")
    assert not (tmp_path / "bpe.gguf").exists()
