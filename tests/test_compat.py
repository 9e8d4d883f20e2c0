"""Every refusal case: a clear reason naming what differs, exit code 2 from the CLI, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from mergegate import IncompatibleModels, merge
from mergegate.demo.samples import SampleShape, write_base, write_finetune, write_tokenizer

from .helpers import recipe_for


def _variant(family, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(family["ft1"], folder)
    return folder


def _merge_expecting(family, tmp_path, other, match):
    recipe = recipe_for("task_arithmetic", {**family, "odd": other}, models=("ft2", "odd"))
    out = tmp_path / "out"
    with pytest.raises(IncompatibleModels, match=match):
        merge(recipe, out, progress=False)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_different_architecture(family, tmp_path):
    odd = _variant(family, tmp_path, "odd")
    config = json.loads((odd / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (odd / "config.json").write_text(json.dumps(config))
    _merge_expecting(family, tmp_path, odd, r"architectures differ: .* is llama/LlamaForCausalLM, .* is "
                                            r"mistral/MistralForCausalLM")


def test_different_shapes_are_listed_by_name(family, tmp_path):
    odd = write_base(tmp_path / "odd", SampleShape(intermediate=96))
    _merge_expecting(family, tmp_path, odd, r"intermediate_size: 128 vs 96")
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 128  # a config that lies about its weights
    (odd / "config.json").write_text(json.dumps(config))
    _merge_expecting(family, tmp_path, odd, r"tensor shapes differ .* model.layers.0.mlp.down_proj.weight: "
                                            r"\[64, 128\] vs \[64, 96\]")


def test_missing_tensor_is_named(family, tmp_path):
    odd = _variant(family, tmp_path, "odd")
    tensors = load_file(odd / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, odd / "model.safetensors")
    _merge_expecting(family, tmp_path, odd, r"missing from .*: model.layers.1.mlp.up_proj.weight")


def test_different_tokenizer_names_sizes_and_tokens(family, tmp_path):
    odd = _variant(family, tmp_path, "odd")
    write_tokenizer(odd, extra_tokens=("<tool>", "</tool>"))
    _merge_expecting(family, tmp_path, odd, r"tokenizers differ: .* has 95 tokens, .* has 97; differing entries "
                                            r"include '<tool>'@95")


def test_unrelated_model_is_refused(family, tmp_path):
    odd = write_base(tmp_path / "odd", seed=123)
    _merge_expecting(family, tmp_path, odd, r"does not look derived from .* differs by 1\.\d\d× its norm")


def test_nan_weights_name_model_tensor_and_file(family, tmp_path):
    odd = write_finetune(family["base"], tmp_path / "odd", seed=5, poison="model.layers.1.self_attn.v_proj.weight")
    _merge_expecting(family, tmp_path, odd, r"tensor 'model.layers.1.self_attn.v_proj.weight' of model '.*odd' "
                                            r"\(.*model.safetensors\) holds NaN")
