"""Rollout plans: portable relative paths, unknown models and missing folders refused by name."""

from __future__ import annotations

import pytest

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


def test_missing_local_folder_is_refused_by_name(family, tmp_path):
    plan = _plan(family)
    plan.models["merged"].path = str(tmp_path / "gone")
    saved = plan.save(tmp_path / "rollout.yaml")
    with pytest.raises(PlanError, match=r"model 'merged' path .*gone is not a folder"):
        load_plan(saved)
