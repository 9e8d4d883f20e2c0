"""The evaluation flags of evaluate, gate, release and search: one declaration, one EvalOptions, a bad value refused
in one line; release's --device is where the candidate is merged too unless --merge-device says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mergegate.cli import app
from mergegate.engine import MergeOptions

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models"
EVAL_FLAGS = {"batch_size", "max_new_tokens", "device", "endpoint_concurrency", "endpoint_timeout",
              "endpoint_retries", "api_key_env"}
SHARDING = {"workers", "ray_address"}


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {param.name: param for param in group.commands[command].params}  # type: ignore[attr-defined]


def test_the_four_commands_share_one_declaration_of_the_evaluation_flags():
    evaluate = _params("evaluate")
    for command in ("gate", "release", "search"):
        params = _params(command)
        for name in EVAL_FLAGS | (SHARDING if command != "search" else set()):
            assert params[name].opts == evaluate[name].opts, (command, name)
            assert (params[name].help, params[name].default) == (evaluate[name].help, evaluate[name].default)
    # the search's --ray-address is its trials' cluster, not the evaluation's shards
    assert "workers" not in _params("search") and "cpus-per-trial" in _params("search")["ray_address"].help


@pytest.mark.parametrize("command", ["evaluate", "gate", "release", "search"])
def test_a_bad_evaluation_flag_is_one_line_and_exit_2_before_anything_is_read(command, tmp_path):
    args = {"evaluate": ["evaluate", "m=/nowhere", "--suite", "s.jsonl"],
            "gate": ["gate", "--candidate", "c=/x", "--base", "b=/x", "--source", "s=/x", "--suite", "s.jsonl"],
            "release": ["release", "recipe.yaml", "--suite", "s.jsonl"],
            "search": ["search", "space.yaml", "--suite", "s.jsonl", "--held-out", "h.jsonl"]}[command]
    result = CliRunner().invoke(app, [*args, "--out" if command != "evaluate" else "--registry",
                                      str(tmp_path / "out"), "--max-new-tokens", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "mergegate: evaluate: max new tokens must be an integer >= 1, got 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusing cuda needs a machine without a GPU")
def test_release_refuses_a_merge_device_this_machine_lacks_by_its_flag(tmp_path):
    result = CliRunner().invoke(app, ["release", "recipe.yaml", "--suite", "s.jsonl", "--out", str(tmp_path / "out"),
                                      "--merge-device", "cuda"])
    assert result.exit_code == 2
    assert result.output.startswith("mergegate: --merge-device 'cuda': no CUDA GPU is available to torch here")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, merged_on", [
    ([], "cpu"),
    (["--device", "cpu"], "cpu"),
    *([(["--device", "cuda"], "cuda"), (["--device", "cuda", "--merge-device", "cpu"], "cpu")]
      if torch.cuda.is_available() else []),
])
def test_release_merges_where_device_says_unless_merge_device_says_otherwise(monkeypatch, tmp_path, flags,
                                                                             merged_on):
    from mergegate import pipeline

    seen: list[MergeOptions] = []

    class Stop(Exception):
        pass

    def stop(recipe, folder, options):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(pipeline, "merge_candidate", stop)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {DEMO / 'base'}\nmodels:\n"
                      f"  - model: {DEMO / 'base'}\n    parameters: {{weight: 1.0}}\n")
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"id": "a", "cohort": "c", "prompt": "p", "expected": "x", "evaluators": ["exact_match"]}\n')
    result = CliRunner().invoke(app, ["release", str(recipe), "--suite", str(suite), "--out", str(tmp_path / "o"),
                                      "--seed", "3", *flags])
    assert isinstance(result.exception, Stop), result.output
    assert seen == [MergeOptions(seed=3, device=merged_on)]
