"""A release: merge the recipe into a candidate, evaluate it with the base and every source on the same
suite, gate each cohort, and write the report and the rollout plan.

Everything after the merge is `gate_release`, the one pipeline behind `release`, `mergegate gate`,
`mergegate release` and the demo."""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .costs import cohort_costs
from .engine import MergeOptions, merge
from .errors import CandidateServerError, RecipeError
from .evaluate import ModelRun, Suite, evaluate_models, load_suite
from .evaluate.endpoint import EndpointSettings
from .evaluate.runner import check_endpoint, check_inputs, check_settings, resolve_device
from .gate import GateResult, Policy, decide, load_policy
from .model_ref import ModelRef, Role
from .recipe import Recipe, load_recipe
from .registry import Measurement, Registry
from .report import write_reports
from .rollout import PlanModel, RolloutPlan, load_plan


@dataclass(frozen=True)
class ReleaseResult:
    """What a gated release wrote and decided: its folder, the candidate, the decisions, the plan, every model's
    run, the report files (md, html, rollout), and when each model's rows were measured (model → cohort)."""

    out: Path
    candidate: ModelRef
    gate: GateResult
    plan: RolloutPlan
    runs: dict[str, ModelRun]
    reports: dict[str, Path]
    measured: dict[str, dict[str, Measurement]] = field(default_factory=dict)


def release_models(recipe: Recipe, candidate_dir: Path, candidate_name: str) -> list[tuple[ModelRef, Role]]:
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


def gate_release(candidate: ModelRef, base: ModelRef, sources: Sequence[ModelRef], suite: Suite | str | Path,
                 policy: Policy | dict | str | Path | None, out: str | Path, *,
                 registry: Registry | str | Path | None = None, batch_size: int = 32, max_new_tokens: int = 64,
                 progress: bool | None = None, title: str | None = None,
                 current: RolloutPlan | str | Path | None = None, device: str | None = None,
                 endpoint: EndpointSettings | None = None, candidate_in_plan: ModelRef | None = None,
                 workers: int | None = None, ray_address: str | None = None) -> ReleaseResult:
    """Evaluate → gate → record → report: the candidate, the base and every source on the same suite rows, a
    decision per cohort recorded in the registry, and report.md, report.html and rollout.yaml written to `out`.

    `registry` is a Registry or its file (default: OUT/registry.sqlite), opened only once the suite, the policy
    and the models have been checked, so a refused input leaves no registry behind. `current` is the plan served
    now (or its rollout.yaml): the report says what changes against it. `device` is where the models are
    evaluated (`evaluate_models`; default: "cuda" when torch sees a GPU, else "cpu"). `endpoint` is how url
    models are called (default EndpointSettings()); given, it is checked even when no model is a url.
    `candidate_in_plan` is the candidate as the rollout plan names it when it differs from the one evaluated (a
    local folder evaluated through a temporary server); it is the result's `candidate` too. `workers` and
    `ray_address` run the evaluation as Ray shards (`evaluate_models`)."""
    out = Path(out)
    if current is not None and not isinstance(current, RolloutPlan):
        current = load_plan(current)  # before any evaluation: a wrong path should not cost one
    suite = _loaded_suite(suite)
    policy = load_policy(policy)
    policy.check_cohorts(suite.cohorts)
    evaluated: list[tuple[ModelRef, Role]] = [(candidate, "candidate"), (base, "base"),
                                              *((source, "source") for source in sources)]
    check_inputs([ref for ref, _ in evaluated], batch_size=batch_size, max_new_tokens=max_new_tokens,
                 endpoint=endpoint, workers=workers, ray_address=ray_address)
    if endpoint is not None:
        check_endpoint(endpoint)
    device = resolve_device(device)  # before the registry: a refused device leaves none behind
    opened_here = not isinstance(registry, Registry)
    if not isinstance(registry, Registry):
        registry = Registry(out / "registry.sqlite" if registry is None else Path(registry))
    with registry.removed_if_nothing_recorded() if opened_here else nullcontext():  # a failed run leaves none
        runs = evaluate_models(evaluated, suite, registry, progress=progress, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, device=device, endpoint=endpoint, workers=workers,
                               ray_address=ray_address)
    gate = decide({name: run.results for name, run in runs.items()}, candidate=candidate.name, base=base.name,
                  sources=[source.name for source in sources], policy=policy)
    registry.add_decisions(runs[candidate.name].model_hash, suite.sha256, gate.policy_sha256, gate.decisions)
    in_plan = [(candidate_in_plan or candidate, "candidate"), *evaluated[1:]]
    plan = RolloutPlan.from_decisions(gate, {ref.name: PlanModel.from_ref(ref, role) for ref, role in in_plan},
                                      suite, policy)
    measured = {name: registry.measurements(run.run_id) for name, run in runs.items()}
    reports = write_reports(out, gate, plan, title=title or f"gate: {candidate.name}", policy=policy,
                            costs=cohort_costs({name: run.results for name, run in runs.items()}), current=current,
                            measured=measured)
    return ReleaseResult(out, candidate_in_plan or candidate, gate, plan, runs, reports, measured)


def release(recipe: Recipe | dict | str | Path, suite: Suite | str | Path,
            policy: Policy | dict | str | Path | None, out: str | Path, *, merge_options: MergeOptions | None = None,
            registry: Registry | str | Path | None = None, candidate_name: str | None = None,
            progress: bool | None = None, batch_size: int = 32, max_new_tokens: int = 64,
            extra_sources: Sequence[ModelRef] = (),
            current: RolloutPlan | str | Path | None = None, device: str | None = None,
            endpoint: EndpointSettings | None = None, serve_candidate: str | None = None,
            serve_timeout: float = 600.0, workers: int | None = None,
            ray_address: str | None = None) -> ReleaseResult:
    """Merge → `gate_release`. `extra_sources` are evaluated and may hold cohorts without being merged (e.g. a
    LoRA specialist served as base + adapter). `endpoint` is how url models are called (checked before the merge).

    `merge_options` go to the candidate's merge as given, except `overwrite`: the candidate's folder,
    OUT/candidate, belongs to the release and is replaced when a release is run again. `progress` is the
    evaluation's progress bar, and the merge's too when no `merge_options` are given.

    `serve_candidate` is a command template (`vllm serve {path} --port {port} --served-model-name {name}`): the
    merged candidate is then evaluated through that server (`candidate_server.served_candidate`, log in
    OUT/candidate-server.log, ready within `serve_timeout` seconds, stopped afterwards however the evaluation
    ends); the rollout plan names the candidate's folder. `workers` and `ray_address` shard the evaluation on Ray
    (`evaluate_models`; checked before the merge)."""
    out = Path(out)
    recipe = load_recipe(recipe)
    suite = _loaded_suite(suite)
    policy = load_policy(policy)
    policy.check_cohorts(suite.cohorts)  # before the merge: a typo in the policy should not cost a merge
    if current is not None and not isinstance(current, RolloutPlan):
        current = load_plan(current)
    if extra_sources:
        check_inputs(list(extra_sources), batch_size=batch_size, max_new_tokens=max_new_tokens, endpoint=endpoint,
                     workers=workers, ray_address=ray_address)
    else:
        check_settings(batch_size=batch_size, max_new_tokens=max_new_tokens, workers=workers,
                       ray_address=ray_address)
    if endpoint is not None:
        check_endpoint(endpoint)
    device = resolve_device(device)  # before the merge: a device this machine lacks should not cost one
    candidate_name = candidate_name or f"merged-{recipe.merge_method}"
    candidate_dir = out / "candidate"
    if serve_candidate is not None:  # before the merge: a bad template or an unservable suite should not cost one
        from .candidate_server import candidate_command
        from .evaluate.endpoint import check_rows

        candidate_command(serve_candidate, candidate_dir, 1, candidate_name)
        if not (isinstance(serve_timeout, (int, float)) and math.isfinite(serve_timeout) and serve_timeout > 0):
            raise CandidateServerError(f"serve timeout must be a finite number of seconds > 0, got {serve_timeout!r}")
        check_rows(ModelRef(candidate_name, url="http://127.0.0.1/v1"), suite.rows)
    merge(recipe, candidate_dir, replace(merge_options or MergeOptions(progress=progress), overwrite=True))
    models = release_models(recipe, candidate_dir, candidate_name)
    base = next(ref for ref, role in models if role == "base")
    sources = [ref for ref, role in models if role == "source"] + list(extra_sources)
    local_candidate = models[0][0]
    with ExitStack() as stack:
        evaluated = local_candidate
        if serve_candidate is not None:
            from .candidate_server import served_candidate

            url = stack.enter_context(served_candidate(serve_candidate, candidate_dir.absolute(), candidate_name,
                                                       out / "candidate-server.log", timeout_s=serve_timeout))
            evaluated = ModelRef(candidate_name, url=url, served_model=candidate_name)
        return gate_release(evaluated, base, sources, suite, policy, out, registry=registry, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=progress,
                            title=f"mergegate release: {candidate_name}", current=current, device=device,
                            endpoint=endpoint, candidate_in_plan=local_candidate, workers=workers,
                            ray_address=ray_address)


def _loaded_suite(suite: Suite | str | Path) -> Suite:
    return suite if isinstance(suite, Suite) else load_suite(suite)


def release_rank(gate: GateResult) -> tuple[int, float]:
    """How good a release is, larger is better: cohorts promoted, then the worst cohort's retention (the
    lowest over cohorts). Never an aggregate mean: a mean can hide one cohort's regression behind another's gain."""
    promoted = sum(d.decision == "promote" for d in gate.decisions)
    return promoted, min((d.retention for d in gate.decisions), default=0.0)
