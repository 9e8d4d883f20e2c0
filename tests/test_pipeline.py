"""merge → evaluate → gate → report, end to end on generated checkpoints, and the shipped demo."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mergegate.evaluate import EvalOptions
from mergegate.gate import load_policy
from mergegate.pipeline import release
from mergegate.registry import Registry
from mergegate.rollout import load_plan

from .helpers import recipe_for

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"


@pytest.fixture
def small_suite(tmp_path):
    rows = []
    for i in range(12):
        rows.append({"id": f"j{i}", "cohort": "json_output", "prompt": f"json {i}:", "expected": "{}",
                     "evaluators": ["json_valid"]})
        rows.append({"id": f"t{i}", "cohort": "tool_required", "prompt": f"tool {i}:", "expected": "search",
                     "tools": ["search", "weather"], "evaluators": ["tool_selection"]})
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_release_writes_reports_rollout_and_decisions(family, small_suite, tmp_path):
    registry = Registry(tmp_path / "registry.sqlite")
    first = release(recipe_for("ties", family, density=0.5), small_suite, {"default": {"max_drop": 0.2}},
                    tmp_path / "ties", eval=EvalOptions(progress=False, max_new_tokens=4), registry=registry)
    assert {p.name for p in (tmp_path / "ties").iterdir()} >= {"candidate", "report.md", "report.html",
                                                                "rollout.yaml", "chart.png", "forest.png"}
    html = (tmp_path / "ties" / "report.html").read_text()
    assert "data:image/png;base64," in html and "json_output" in html
    # what ships comes first; latency and tokens come from the runs' rows
    assert html.index('id="what-ships"') < html.index('id="intervals"') and "latency p99 ms" in html
    plan = load_plan(tmp_path / "ties" / "rollout.yaml")
    assert plan.candidate == "merged-ties" and set(plan.routes) == {"json_output", "tool_required"}
    assert plan.routes["json_output"].check == "json_valid"
    assert plan.routes["tool_required"].check == "tool_selection"
    assert plan.routes["tool_required"].tools == ["search", "weather"]
    assert Path(plan.models["merged-ties"].path).is_dir() and plan.models["base"].role == "base"
    for d in first.gate.decisions:
        assert plan.routes[d.cohort].model == d.model and plan.routes[d.cohort].decision == d.decision
    assert set(first.runs) == {"merged-ties", "base", "ft1", "ft2", "ft3"}
    assert not any(run.cached for run in first.runs.values())
    rows = sqlite3.connect(tmp_path / "registry.sqlite").execute("SELECT cohort, decision FROM decisions").fetchall()
    assert sorted(rows) == sorted((d.cohort, d.decision) for d in first.gate.decisions)

    second = release(recipe_for("task_arithmetic", family), small_suite, None, tmp_path / "ta",
                     eval=EvalOptions(progress=False, max_new_tokens=4), registry=registry,
                     current=tmp_path / "ties" / "rollout.yaml")
    assert "vs current" in (tmp_path / "ta" / "report.html").read_text()  # against the plan served now
    assert all(second.runs[name].cached for name in ("base", "ft1", "ft2", "ft3"))
    assert not second.runs["merged-task_arithmetic"].cached


def test_release_needs_a_base_model(family, small_suite, tmp_path):
    from mergegate import RecipeError

    with pytest.raises(RecipeError, match="a release needs base_model"):
        release(recipe_for("linear", family, base=False), small_suite, None, tmp_path / "o",
                eval=EvalOptions(progress=False))


def test_gate_release_checks_every_model_before_opening_the_registry(family, small_suite, tmp_path):
    from mergegate import MergegateError
    from mergegate.model_ref import ModelRef
    from mergegate.pipeline import gate_release

    with pytest.raises(MergegateError, match="model 'gone': .* no such folder"):
        gate_release(ModelRef("cand", family["ft1"]), ModelRef("base", family["base"]),
                     [ModelRef("up", url="http://127.0.0.1:9/v1"), ModelRef("gone", tmp_path / "missing")],
                     small_suite, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _follows_policy(decision, rule) -> bool:
    promote_ok = (decision.candidate_mean >= rule.min_score and decision.retention >= rule.min_retention
                  and decision.diff_low >= -rule.max_drop)
    if decision.decision == "promote":
        return promote_ok
    if decision.decision == "reject":
        return not promote_ok and decision.diff_high < -rule.max_drop
    return not promote_ok and decision.diff_high >= -rule.max_drop


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "models" / "base" / "config.json").is_file(), reason="demo models not built")
def test_demo_end_to_end(tmp_path):
    from mergegate.demo import run_demo

    results = run_demo(tmp_path, DEMO)
    assert {p.name for p in tmp_path.iterdir()} >= {"report.html", "report.md", "rollout.yaml", "summary.png"}
    policy = load_policy(DEMO / "policy.yaml")
    decisions = [d for result in results.values() for d in result.gate.decisions]
    assert {d.cohort for d in decisions} >= {"tool_required", "json_output", "policy_refusal", "out_of_domain"}
    for d in decisions:
        assert _follows_policy(d, policy.rule(d.cohort)), d
    assert any(d.decision == "promote" for d in decisions)
    assert any(d.decision != "promote" for d in decisions)
    plan = load_plan(tmp_path / "rollout.yaml")
    assert plan.candidate.startswith("merged-")
    # the demo policy's default_route: requests no cohort claims go where out_of_domain goes
    assert plan.default == plan.routes["out_of_domain"].model_copy(update={"decision": None})
    for name, model in plan.models.items():  # the top-level plan's relative paths still point at the models
        assert (Path(model.path) / "config.json").is_file(), name


def test_model_plus_adapter_sources_are_evaluated_as_base_with_adapter(tmp_path):
    from mergegate.pipeline import release_models
    from mergegate.recipe import load_recipe

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo" / "models"
    recipe = load_recipe({"merge_method": "task_arithmetic", "base_model": str(demo / "base"), "models": [
        {"model": str(demo / "tool_required"), "parameters": {"weight": 1.0}},
        {"model": f"{demo / 'base'}+{demo / 'arithmetic_lora'}", "parameters": {"weight": 1.0}}]})
    models = {ref.name: (ref, role) for ref, role in release_models(recipe, tmp_path / "candidate", "cand")}
    lora, _ = models["arithmetic_lora"]
    assert lora.path == (demo / "base").resolve()
    assert lora.adapter == (demo / "arithmetic_lora").resolve()
    base, role = models["base"]
    assert role == "base" and base.adapter is None
