"""`mergegate lora merge|combine|extract` through typer's CliRunner on a fresh app: exit 0 with a summary on
success, exit 2 with the reason when refused, nothing written then."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergegate.cli.lora import parse_weights, register
from mergegate.lora import read_adapter

pytestmark = pytest.mark.one_torch_thread


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Test root: keeps `lora` a sub-command group."""

    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def extracted(cli, family, tmp_path_factory):
    """Rank-2 adapters of ft1 and ft2 on q_proj and v_proj, extracted through the CLI."""
    root = tmp_path_factory.mktemp("cli_lora")
    out = {}
    for name in ("ft1", "ft2"):
        result = cli("lora", "extract", family["base"], family[name], root / name, "--rank", "2",
                     "--target-modules", "q_proj,v_proj")
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def test_help_lists_the_three_commands(cli):
    result = cli("lora", "--help")
    assert result.exit_code == 0
    assert all(command in result.output for command in ("merge", "combine", "extract"))


def test_extract_reports_ranks_and_writes_a_peft_config(extracted):
    config = json.loads((extracted["ft1"] / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"] and config["peft_type"] == "LORA"
    assert len(read_adapter(extracted["ft1"]).modules) == 4  # 2 layers × (q_proj, v_proj)


def test_merge_writes_base_plus_weighted_delta(cli, family, extracted, tmp_path):
    result = cli("lora", "merge", family["base"], extracted["ft1"], tmp_path / "out", "--weight", "0.5")
    assert result.exit_code == 0, result.output
    assert "merged adapter" in result.output
    merged, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(family["base"] / "model.safetensors")
    adapter = read_adapter(extracted["ft1"])
    name = "model.layers.1.self_attn.v_proj.weight"
    diff = (merged[name] - (base[name] + 0.5 * adapter.delta(name))).abs().max().item()
    assert diff < 1e-6, f"max abs diff {diff}"
    assert torch.equal(merged["model.layers.1.self_attn.k_proj.weight"], base["model.layers.1.self_attn.k_proj.weight"])


def test_combine_cat_is_the_weighted_sum(cli, extracted, tmp_path):
    result = cli("lora", "combine", extracted["ft1"], extracted["ft2"], tmp_path / "cat", "--type", "cat",
                 "--weights", "0.5,-0.25")
    assert result.exit_code == 0, result.output
    assert "combined 2 adapter(s) (cat)" in result.output
    combined, a, b = (read_adapter(p) for p in (tmp_path / "cat", extracted["ft1"], extracted["ft2"]))
    diff = max((combined.delta(n) - 0.5 * a.delta(n) + 0.25 * b.delta(n)).abs().max().item() for n in a.modules)
    assert diff < 1e-6, f"max abs diff {diff}"


@pytest.mark.parametrize("args,message", [
    (["combine", "{a}", "{b}", "{out}", "--type", "cat", "--weights", "1"], "1 weight(s) for 2 adapter(s)"),
    (["combine", "{a}", "{b}", "{out}", "--type", "ties"], "needs density"),
    (["merge", "{base}", "{missing}", "{out}"], "no such folder"),
    (["extract", "{base}", "{base}", "{out}"], "give rank"),
])
def test_refusals_exit_2_with_the_reason(cli, family, extracted, tmp_path, args, message):
    values = {"a": extracted["ft1"], "b": extracted["ft2"], "out": tmp_path / "out", "base": family["base"],
              "missing": tmp_path / "missing"}
    result = cli("lora", *[a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_parse_weights():
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0]
    assert parse_weights("0.5, -1 2", 3) == [0.5, -1.0, 2.0]
    with pytest.raises(ValueError, match="expected numbers"):
        parse_weights("a,b", 2)
