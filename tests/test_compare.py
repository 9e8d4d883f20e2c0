"""`compare_adapters`: merges, the cohort's own adapter on the shared base and a learned router among the adapters,
each gated on its own beside the same sources, with each serving plan's held bytes and latency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergegate.compare import ROUTER, ROUTES, compare_adapters
from mergegate.engine import MergeOptions, merge
from mergegate.errors import MergegateError
from mergegate.evaluate import EvalOptions, load_suite
from mergegate.model_ref import ModelRef
from mergegate.recipe import load_recipe

from .helpers import write_jsonl

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
MODELS = DEMO / "models"
POLICY = {"bootstrap": 200, "default": {"min_rows": 5}}


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if seen.setdefault(row["cohort"], 0) < 6:
            seen[row["cohort"]] += 1
            rows.append(row)
    return load_suite(write_jsonl(tmp_path_factory.mktemp("suite") / "suite.jsonl", rows))


@pytest.mark.slow
def test_merge_adapter_routes_and_router_are_gated_side_by_side_with_their_serving_cost(tmp_path, small_suite):
    merged = tmp_path / "ties"
    merge(load_recipe(DEMO / "recipes" / "ties.yaml"), merged, MergeOptions(progress=False))
    result = compare_adapters(
        ModelRef("base", MODELS / "base"), {"arithmetic": MODELS / "arithmetic_lora"}, small_suite, POLICY,
        tmp_path / "out", merges=[ModelRef("ties", merged)],
        sources=[ModelRef(n, MODELS / n) for n in ("tool_required", "json_output", "policy_refusal")],
        calibration=DEMO / "calibration.jsonl", eval=EvalOptions(batch_size=8, max_new_tokens=16, progress=False))

    assert list(result.gates) == ["ties", ROUTES, ROUTER]
    # the arithmetic adapter on the shared base keeps arithmetic, which the merge (of the full fine-tunes) cannot
    assert result.gates[ROUTES].decision("arithmetic").decision == "promote"
    assert result.gates["ties"].decision("arithmetic").decision != "promote"
    routes = {r.row_id: r.output for r in result.runs[ROUTES].results}
    router = {r.row_id: r.output for r in result.runs[ROUTER].results}
    assert routes == router  # the router learned the routes from the calibration rows alone
    assert (tmp_path / "out" / "router" / "router.json").is_file()

    costs = {cost.plan: cost for cost in result.costs}
    one_model = costs["ties"].parameter_bytes
    assert one_model < costs[ROUTES].parameter_bytes < 1.2 * one_model  # one base + a LoRA
    assert costs[ROUTER].parameter_bytes > costs[ROUTES].parameter_bytes  # + the router's tensors
    assert costs["separate models"].parameter_bytes == 5 * one_model  # 4 full models + the base
    assert all(cost.latency_p50_ms > 0 for cost in result.costs)
    page = (tmp_path / "out" / "compare.md").read_text()
    assert "Serving cost per plan" in page and "one base + 1 adapter" in page and "kept by" in page
    assert (tmp_path / "out" / "compare.html").is_file()

    # each candidate's plan serves the adapter sources on one shared base: where the merge is rejected, the cohort
    # falls back to its own adapter there; the router's plan serves its promoted cohorts with the router
    from mergegate.rollout import load_plan

    merge_plan = load_plan(result.reports["ties/rollout"])
    assert merge_plan.routes["arithmetic"].model == "arithmetic"
    assert merge_plan.model_ref("arithmetic") == ModelRef("arithmetic", MODELS / "base",
                                                          adapter=MODELS / "arithmetic_lora")
    assert merge_plan.models["base"].base == "shared" and merge_plan.models["ties"].path is not None
    router_plan = load_plan(result.reports[f"{ROUTER}/rollout"])
    assert router_plan.routes["arithmetic"].model == ROUTER
    assert router_plan.models[ROUTER].router == str(tmp_path / "out" / "router")


def test_an_adapter_named_after_no_cohort_is_refused(tmp_path, small_suite):
    with pytest.raises(MergegateError, match="adapters are named by the cohort they serve; maths given"):
        compare_adapters(ModelRef("base", MODELS / "base"), {"maths": MODELS / "arithmetic_lora"}, small_suite,
                         POLICY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_adapter_folder_is_refused_before_anything_is_written(tmp_path, small_suite):
    with pytest.raises(MergegateError, match="model 'arithmetic': adapter .*no/such: no such folder"):
        compare_adapters(ModelRef("base", MODELS / "base"), {"arithmetic": tmp_path / "no" / "such"}, small_suite,
                         POLICY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_an_adapter_without_its_cohort_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from mergegate.cli import app

    result = CliRunner().invoke(app, ["compare", "--base", f"base={MODELS / 'base'}", "--adapter",
                                      str(MODELS / "arithmetic_lora"), "--suite", str(DEMO / "suite.jsonl"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "expected COHORT=PATH" in result.output and not (tmp_path / "out").exists()


def test_a_router_trained_for_other_adapters_is_refused_before_anything_is_written(tmp_path, small_suite):
    import torch

    from mergegate.evaluate.adapter_router import AdapterRouter

    folder = AdapterRouter(("maths", "(base)"), torch.zeros(2, 4), torch.zeros(2), torch.zeros(4), torch.ones(4),
                           MODELS / "base", {"maths": MODELS / "arithmetic_lora"}, {}).save(tmp_path / "router")
    with pytest.raises(MergegateError, match="router .* not on this base with these adapters"):
        compare_adapters(ModelRef("base", MODELS / "base"), {"arithmetic": MODELS / "arithmetic_lora"}, small_suite,
                         POLICY, tmp_path / "out", router=folder)
    assert not (tmp_path / "out").exists()
