"""A release: merge the recipe into a candidate, evaluate it with the base and every source on the same
suite, gate each cohort, and write the report and the rollout plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .engine import merge
from .errors import RecipeError
from .evaluate import ModelRun, evaluate_models, load_suite
from .evaluate.runner import check_inputs, check_settings
from .gate import GateResult, decide, load_policy
from .model_ref import ModelRef, Role
from .recipe import load_recipe
from .registry import Registry
from .report import rollout_plan, write_reports
from .rollout import PlanModel, RolloutPlan


@dataclass(frozen=True)
class ReleaseResult:
    out: Path
    candidate: ModelRef
    gate: GateResult
    plan: RolloutPlan
    runs: dict[str, ModelRun]
    reports: dict[str, Path]


def release_models(recipe, candidate_dir: Path, candidate_name: str) -> list[tuple[ModelRef, Role]]:
    """The candidate, the base and every source the recipe names, with their roles and unique display names.
    A `model+adapter` source is evaluated and served as the model with its adapter (not the folded copy)."""
    if not recipe.base_model:
        raise RecipeError("a release needs base_model in the recipe: the base is evaluated beside every source")
    models: list[tuple[ModelRef, Role]] = [(ModelRef(candidate_name, Path(candidate_dir)), "candidate")]
    taken = {candidate_name}
    for text in recipe.model_refs():
        ref = ModelRef.parse(text, name=text).resolve(recipe.folder)
        if ref.path is None:
            raise RecipeError(f"model '{text}': a recipe merges local folders, not a server's url")
        path, adapter = ref.path.resolve(), ref.adapter.resolve() if ref.adapter is not None else None
        shown = adapter or path
        name = shown.name
        while name in taken:
            name = f"{shown.parent.name}/{name}"
        taken.add(name)
        models.append((ModelRef(name, path, adapter=adapter), "base" if text == recipe.base_model else "source"))
    return models


def release(recipe, suite, policy, out: str | Path, *, registry: Registry | None = None,
            candidate_name: str | None = None, seed: int = 0, progress: bool | None = None,
            batch_size: int = 32, max_new_tokens: int = 64,
            extra_sources: Sequence[ModelRef] = ()) -> ReleaseResult:
    """Merge → evaluate → gate → report. `extra_sources` are evaluated and may hold cohorts without being
    merged (e.g. a LoRA specialist served as base + adapter)."""
    out = Path(out)
    recipe = load_recipe(recipe)
    suite = load_suite(suite)
    policy = load_policy(policy)
    policy.check_cohorts(suite.cohorts)  # before the merge: a typo in the policy should not cost a merge
    if extra_sources:
        check_inputs(list(extra_sources), batch_size=batch_size, max_new_tokens=max_new_tokens)
    else:
        check_settings(batch_size=batch_size, max_new_tokens=max_new_tokens)
    candidate_name = candidate_name or f"merged-{recipe.merge_method}"
    candidate_dir = out / "candidate"
    merge(recipe, candidate_dir, seed=seed, overwrite=True, progress=progress)
    evaluated = release_models(recipe, candidate_dir, candidate_name) + [(ref, "source") for ref in extra_sources]
    registry = registry or Registry(out / "registry.sqlite")
    runs = evaluate_models(evaluated, suite, registry, progress=progress, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    base = next(ref.name for ref, role in evaluated if role == "base")
    sources = [ref.name for ref, role in evaluated if role == "source"]
    gate = decide({name: run.results for name, run in runs.items()}, candidate=candidate_name, base=base,
                  sources=sources, policy=policy)
    registry.add_decisions(runs[candidate_name].model_hash, suite.sha256, gate.policy_sha256, gate.decisions)
    models = {ref.name: PlanModel.from_ref(ref, role) for ref, role in evaluated}
    plan = rollout_plan(gate, models, suite)
    reports = write_reports(out, gate, plan, title=f"mergegate release: {candidate_name}")
    return ReleaseResult(out, evaluated[0][0], gate, plan, runs, reports)
