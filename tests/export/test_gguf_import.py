"""A GGUF file turned back into a model folder: the tiny demo base exported with `export_gguf`, imported with
`import_gguf`, holds the same weights (float16's values exactly for f16, the decoded blocks for q8_0), and bad
input is refused with nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ..helpers import assert_refused

pytest.importorskip("gguf")

from safetensors.torch import load_file  # noqa: E402

from mergegate.cli import app  # noqa: E402
from mergegate.errors import GGUFImportError  # noqa: E402
from mergegate.export import export_gguf, import_gguf  # noqa: E402

BASE = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models" / "base"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-import")
    return {qtype: export_gguf(BASE, out / f"base-{qtype}.gguf", qtype).path for qtype in ("f16", "q8_0")}


def _weights(folder: Path) -> dict:
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def test_an_f16_file_comes_back_as_the_source_rounded_to_float16(exported, tmp_path):
    result = import_gguf(exported["f16"], tmp_path / "back")
    assert result.architecture == "LlamaForCausalLM" and not result.dequantized
    source, back = _weights(BASE), _weights(tmp_path / "back")
    assert set(back) <= set(source) and "model.embed_tokens.weight" in back
    for name, tensor in back.items():
        want = source[name]
        if want.ndim > 1:  # matrices were written as float16, norms as float32
            want = want.half().float()
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert bool((tensor == want).all()), name
    record = json.loads((tmp_path / "back" / "gguf_source.json").read_text())
    assert record["file"] == "base-f16.gguf" and record["dequantized"] is False and len(record["sha256"]) == 64


def test_a_quantized_file_is_dequantized_within_the_formats_error(exported, tmp_path):
    result = import_gguf(exported["q8_0"], tmp_path / "back")
    assert result.dequantized and "Q8_0" in result.tensor_types
    source, back = _weights(BASE), _weights(tmp_path / "back")
    changed = 0
    for name, tensor in back.items():
        assert tensor.dtype == source[name].dtype and tensor.shape == source[name].shape, name
        if tensor.ndim > 1:  # q8_0: per 32-value block, error <= d/2 with d = (block's largest magnitude) / 127
            bound = float(source[name].abs().max()) / 127
            assert float((tensor - source[name]).abs().max()) <= bound, name
            changed += int(not bool((tensor == source[name]).all()))
    assert changed > 0  # the weights really went through the quantizer and back


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_the_folders_config_does_not_say_gguf_quantization(exported, qtype, tmp_path):
    # its weights are plain float32: a config naming GGUF quantization makes vLLM refuse the folder
    import_gguf(exported[qtype], tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in config


def test_a_file_that_is_not_gguf_is_refused_and_nothing_is_written(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="model.gguf"):
        import_gguf(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_the_command_writes_the_folder_and_refuses_an_existing_one(exported, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["import-gguf", str(exported["q8_0"]), str(tmp_path / "back")])
    assert done.exit_code == 0, done.output
    assert "dequantized to float32" in done.output and (tmp_path / "back" / "config.json").is_file()
    again = runner.invoke(app, ["import-gguf", str(exported["q8_0"]), str(tmp_path / "back")])
    assert_refused(again, "back")
    missing = runner.invoke(app, ["import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "other")])
    assert_refused(missing, "nope.gguf", "no such file")
