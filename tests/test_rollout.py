"""Rollout plans: portable relative paths, unknown models and missing folders refused by name."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate.rollout import PlanError, PlanModel, RolloutPlan, Route, load_plan


def _plan(family) -> RolloutPlan:
    models = {"base": PlanModel(role="base", path=str(family["base"])),
              "merged": PlanModel(role="candidate", path=str(family["ft1"]))}
    return RolloutPlan(candidate="merged", models=models,
                       routes={"json_output": Route(model="merged", fallback=["base"], check="json_valid")},
                       default=Route(model="base"))


def test_paths_are_saved_relative_and_resolve_from_any_folder(family, tmp_path):
    (tmp_path / "a").mkdir()
    saved = _plan(family).save(tmp_path / "a" / "rollout.yaml")
    assert "path: ../" in saved.read_text()  # relative to the plan's folder, so the folder can move with it
    moved = load_plan(saved).save(tmp_path / "rollout.yaml")  # re-anchored one folder up
    plan = load_plan(moved)
    assert plan.models["merged"].path == str(family["ft1"].resolve())
    assert plan.route("json_output").fallback == ["base"] and plan.route("unknown").model == "base"


def test_unknown_model_in_a_route_is_refused():
    with pytest.raises(ValueError, match="route 'json_output' names model 'ghost', which is not among models"):
        RolloutPlan(candidate="m", models={"m": PlanModel(path="/x")},
                    routes={"json_output": Route(model="ghost")}, default=Route(model="m"))


def _decided(tmp_path):
    """A gate result over two cohorts (held json_output, promoted out_of_domain), its suite and plan models."""
    import json

    from mergegate.evaluate import load_suite
    from mergegate.gate import CohortDecision, GateResult

    rows = [{"id": "j", "cohort": "json_output", "prompt": "p", "expected": "{}", "evaluators": ["json_schema"],
             "schema": {"type": "object"}},
            {"id": "o", "cohort": "out_of_domain", "prompt": "p", "expected": "x", "evaluators": ["exact_match"]}]
    (tmp_path / "suite.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    numbers = dict(rows=1, candidate_mean=0.5, best_source="src", best_source_mean=0.5, base_mean=0.4, diff_mean=0.0,
                   diff_low=-0.1, diff_high=0.1, retention=1.0, retention_low=0.9, retention_high=1.1)
    gate = GateResult("cand", [
        CohortDecision("json_output", "hold", "src", mirror_share=0.1, fallback=("src", "base"), **numbers),
        CohortDecision("out_of_domain", "promote", "cand", mirror_share=0.0, fallback=("cand", "src", "base"),
                       **numbers)], {}, "0" * 64)
    models = {"cand": PlanModel(role="candidate", path="/m/cand"), "base": PlanModel(role="base", path="/m/base"),
              "src": PlanModel(role="source", path="/m/src")}
    return gate, models, load_suite(tmp_path / "suite.jsonl")


def test_the_plan_routes_each_cohort_as_decided_with_its_online_check(tmp_path):
    from mergegate.gate import load_policy

    plan = RolloutPlan.from_decisions(*_decided(tmp_path), load_policy(None))
    assert plan.candidate == "cand" and list(plan.models) == ["cand", "base", "src"]
    assert plan.routes["json_output"] == Route(model="src", fallback=["src", "base"], mirror=0.1, decision="hold",
                                               check="json_valid")
    assert plan.routes["out_of_domain"] == Route(model="cand", fallback=["cand", "src", "base"], decision="promote")


def test_without_a_default_route_in_the_policy_the_default_is_the_base_unmirrored(tmp_path):
    from mergegate.gate import load_policy

    plan = RolloutPlan.from_decisions(*_decided(tmp_path), load_policy(None))
    assert plan.default == Route(model="base") and plan.default.mirror == 0.0  # even with a cohort named out_of_domain


def test_the_default_route_follows_the_cohort_the_policy_names(tmp_path):
    from mergegate.gate import load_policy

    gate, models, suite = _decided(tmp_path)
    plan = RolloutPlan.from_decisions(gate, models, suite, load_policy({"default_route": "json_output"}))
    assert plan.default == Route(model="src", fallback=["src", "base"], mirror=0.1, check="json_valid")
    assert plan.default.decision is None and plan.routes["json_output"].decision == "hold"
    plan = RolloutPlan.from_decisions(gate, models, suite, load_policy({"default_route": "out_of_domain"}))
    assert plan.default == Route(model="cand", fallback=["cand", "src", "base"])
    with pytest.raises(PlanError, match="default_route 'tool_required': the gate decided no such cohort"):
        RolloutPlan.from_decisions(gate, models, suite, load_policy({"default_route": "tool_required"}))



def test_a_routes_fallback_is_the_gates_chain_ranked_by_score(tmp_path):
    """A held cohort falls over to a generalist source that beats the base there, before the base."""
    import json

    from mergegate.evaluate import load_suite
    from mergegate.gate import decide, load_policy
    from mergegate.registry import RowResult

    n = 40
    rows = [{"id": f"j{i}", "cohort": "json_output", "prompt": "p", "expected": "{}", "evaluators": ["json_valid"]}
            for i in range(n)]
    (tmp_path / "suite.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    means = {"base": 0.25, "spec": 0.9, "generalist": 0.6, "cand": 0.8}
    results = {name: [RowResult(f"j{i}", "json_output", name, "h", "", 1, 1, 1.0, float(i < mean * n), i < mean * n, {})
                      for i in range(n)] for name, mean in means.items()}
    gate = decide(results, candidate="cand", base="base", sources=["spec", "generalist"])
    models = {name: PlanModel(role={"cand": "candidate", "base": "base"}.get(name, "source"), path=f"/m/{name}")
              for name in means}
    plan = RolloutPlan.from_decisions(gate, models, load_suite(tmp_path / "suite.jsonl"), load_policy(None))
    route = plan.routes["json_output"]
    assert (route.decision, route.model, route.fallback) == ("hold", "spec", ["generalist", "base"])


def test_a_routes_chain_puts_a_base_that_scores_before_sources_that_score_nothing(tmp_path):
    """Sources that fail the cohort come after a base that passes it: the plan falls over to the base first."""
    import json

    from mergegate.evaluate import load_suite
    from mergegate.gate import decide, load_policy
    from mergegate.registry import RowResult

    n = 40
    rows = [{"id": f"j{i}", "cohort": "json_output", "prompt": "p", "expected": "{}", "evaluators": ["json_valid"]}
            for i in range(n)]
    (tmp_path / "suite.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    means = {"base": 0.6, "add": 0.0, "tool": 0.0, "json": 0.9, "cand": 0.0}
    results = {name: [RowResult(f"j{i}", "json_output", name, "h", "", 1, 1, 1.0, float(i < mean * n), i < mean * n, {})
                      for i in range(n)] for name, mean in means.items()}
    gate = decide(results, candidate="cand", base="base", sources=["add", "tool", "json"])
    models = {name: PlanModel(role={"cand": "candidate", "base": "base"}.get(name, "source"), path=f"/m/{name}")
              for name in means}
    plan = RolloutPlan.from_decisions(gate, models, load_suite(tmp_path / "suite.jsonl"), load_policy(None))
    route = plan.routes["json_output"]
    assert (route.decision, route.model, route.fallback) == ("reject", "json", ["base", "add", "tool"])

def test_missing_local_folder_is_refused_by_name(family, tmp_path):
    plan = _plan(family)
    plan.models["merged"].path = str(tmp_path / "gone")
    saved = plan.save(tmp_path / "rollout.yaml")
    with pytest.raises(PlanError, match=r"model 'merged' path .*gone is not a folder"):
        load_plan(saved)


# --- properties: any text is a rollout plan or a PlanError ----------------------------------------------------

_PLAN_FIELDS = ["version", "candidate", "models", "routes", "default", "model", "fallback", "check", "role", "path",
                "adapter", "url", "upstream_model", "m", "json_output", "!!python/object:os.system", "&a", "*a"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from([".", "..", "/", "m", "base", "candidate", "json_valid",
                                                           "http://127.0.0.1:1/v1", "a\x00b", "x" * 300, "[", "~"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_PLAN_FIELDS), inner, max_size=4)), max_leaves=14)


def _check_plan_text(folder, text: str | bytes) -> None:
    path = folder / "rollout.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        plan = load_plan(path)
    except PlanError as exc:
        assert str(exc).startswith(f"rollout plan {path}: ") and "\n" not in str(exc)
    else:
        assert isinstance(plan, RolloutPlan) and plan.candidate in plan.models


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(), st.binary()))
def test_any_text_is_a_rollout_plan_or_a_plan_error(tmp_path, text):
    _check_plan_text(tmp_path, text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(_PLAN_FIELDS), _VALUES, max_size=5), flow=st.booleans())
def test_any_yaml_mapping_is_a_rollout_plan_or_a_plan_error(tmp_path, data, flow):
    _check_plan_text(tmp_path, yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True))


def test_any_valid_plan_shape_with_odd_paths_is_a_plan_or_a_plan_error(tmp_path):
    (tmp_path / "here").mkdir()
    for value in [".", "here", "missing", "a\x00b", "x" * 5000, "/", "../" * 50]:
        plan = {"candidate": "m", "models": {"m": {"path": value}}, "routes": {}, "default": {"model": "m"}}
        _check_plan_text(tmp_path, yaml.safe_dump(plan))


def test_a_plan_of_cascades_asks_the_candidate_first_and_the_cohorts_model_when_its_answer_fails():
    models = {name: PlanModel(role=role, path=f"/m/{name}") for name, role in
              (("cand", "candidate"), ("base", "base"), ("json", "source"), ("tools", "source"))}
    plan = RolloutPlan(candidate="cand", models=models, routes={
        "json_output": Route(model="json", fallback=["cand", "base"], mirror=0.1, decision="hold", check="json_valid"),
        "chat": Route(model="cand", fallback=["base"], decision="promote")}, default=Route(model="base"))
    cascades = plan.with_cascades({"json_output": "json", "chat": "cand"}, default_cohort="json_output")
    json_route = cascades.route("json_output")
    assert json_route.model == "cand" and json_route.strategy is not None
    assert (json_route.strategy.kind, json_route.strategy.models) == ("cascade", ["cand", "json"])
    assert (json_route.fallback, json_route.mirror, json_route.decision, json_route.check) == (
        ["base"], 0.0, None, "json_valid")  # the chain behind the cascade and the check stay; mirror and decision go
    assert cascades.route("chat").strategy.models == ["cand"]
    assert cascades.default == json_route
    assert plan.with_cascades({"json_output": "json", "chat": "cand"}).default == plan.default
    with pytest.raises(ValueError, match="not among models"):
        plan.with_cascades({"json_output": "ghost", "chat": "cand"})


def test_a_plan_of_one_model_answers_every_request_with_it():
    plan = RolloutPlan.single_model("served", PlanModel(role="candidate", path="/m/served"))
    assert (plan.candidate, list(plan.models), plan.routes) == ("served", ["served"], {})
    assert plan.route("any cohort") == Route(model="served")
