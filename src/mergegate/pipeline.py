"""A release: merge the recipe into a candidate, evaluate it with the base and every source on the same
suite, gate each cohort, and write the report and the rollout plan.

The steps, each one function used by `release`, `gate_release` (`mergegate gate`, `mergegate release`, the demo)
and the search's trials: merge the candidate into its folder (`merge_candidate`), evaluate it as it is or through
its own server (`evaluated_candidate`), evaluate and decide (`evaluate_and_decide`), plan and report
(`report_release`)."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from .costs import cohort_costs
from .engine import MergeOptions, merge
from .errors import CandidateServerError, RecipeError
from .evaluate import EvalOptions, ModelRun, Suite, SuiteRow, evaluate_models, load_suite
from .evaluate.runner import check_models
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


@dataclass(frozen=True)
class Lineup:
    """The models a gate compares on the same rows: the candidate, the base and every source."""

    candidate: ModelRef
    base: ModelRef
    sources: tuple[ModelRef, ...]

    def with_roles(self) -> list[tuple[ModelRef, Role]]:
        return [(self.candidate, "candidate"), (self.base, "base"), *((source, "source") for source in self.sources)]


@dataclass(frozen=True)
class ServeCommand:
    """How a merged candidate is evaluated through its own server: a command template (`vllm serve {path} --port
    {port} --served-model-name {name}`, `serving.launcher`) and the seconds its server may take to list the model.
    Refused on construction (CandidateServerError): a template that is empty, does not split, or names another
    placeholder; a timeout that is not a finite number of seconds > 0."""

    template: str
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        from .serving.launcher import candidate_command

        candidate_command(self.template, Path("candidate"), 1, "candidate")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
                                             and timeout > 0):
            raise CandidateServerError(f"serve timeout must be a finite number of seconds > 0, got {timeout!r}")

    def check_rows(self, name: str, rows: Sequence[SuiteRow]) -> None:
        """Refuse rows a server cannot answer (perplexity) before a merge is spent on a candidate served `name`."""
        from .evaluate.endpoint import check_rows

        check_rows(ModelRef(name, url="http://127.0.0.1/v1"), rows)


def merge_candidate(recipe: Recipe, folder: Path, options: MergeOptions) -> None:
    """Merge `recipe` into `folder`, the candidate's: replaced whenever the candidate is merged again."""
    merge(recipe, folder, replace(options, overwrite=True))


@contextmanager
def evaluated_candidate(candidate: ModelRef, serve: ServeCommand | None, log: Path) -> Iterator[ModelRef]:
    """The candidate as it is evaluated: itself; or, with `serve`, its folder behind a server started from the
    template (its output in `log`), as a url model, the server stopped when the block ends, however it ends."""
    if serve is None or candidate.path is None:
        yield candidate
        return
    from .serving.launcher import served_candidate

    with served_candidate(serve.template, candidate.path.absolute(), candidate.name, log,
                          timeout_s=serve.timeout_s) as url:
        yield ModelRef(candidate.name, url=url, served_model=candidate.name)


def gate_release(candidate: ModelRef, base: ModelRef, sources: Sequence[ModelRef], suite: Suite | str | Path,
                 policy: Policy | dict | str | Path | None, out: str | Path, *, eval: EvalOptions | None = None,
                 registry: Registry | str | Path | None = None, title: str | None = None,
                 current: RolloutPlan | str | Path | None = None) -> ReleaseResult:
    """Evaluate → gate → record → report: the candidate, the base and every source on the same suite rows (as
    `eval` says; default EvalOptions()), a decision per cohort recorded in the registry, and report.md,
    report.html and rollout.yaml written to `out`.

    `registry` is a Registry or its file (default: OUT/registry.sqlite), opened only once the suite, the policy
    and the models have been checked, so a refused input leaves no registry behind. `current` is the plan served
    now (or its rollout.yaml): the report says what changes against it."""
    out = Path(out)
    current = _loaded_plan(current)  # before any evaluation: a wrong path should not cost one
    suite, policy = _checked_suite_and_policy(suite, policy)
    lineup = Lineup(candidate, base, tuple(sources))
    runs, gate, registry = evaluate_and_decide(lineup, suite, policy, out, eval=eval, registry=registry)
    return report_release(out, lineup, runs, gate, suite, policy, registry, title=title or f"gate: {candidate.name}",
                          current=current)


def evaluate_and_decide(lineup: Lineup, suite: Suite, policy: Policy, out: Path, *, eval: EvalOptions | None,
                        registry: Registry | str | Path | None) -> tuple[dict[str, ModelRun], GateResult, Registry]:
    """Evaluate every model of the lineup on the suite's rows, decide each cohort (`gate.decide`) and record the
    decisions in the registry (a Registry, its file, or None: OUT/registry.sqlite). A registry opened here is
    opened only once the models have been checked, and removed again when the evaluation fails before recording
    anything. Returns the runs, the gate's result and the registry."""
    eval = eval if eval is not None else EvalOptions()
    evaluated = lineup.with_roles()
    check_models([ref for ref, _ in evaluated], eval.endpoint)
    opened_here = not isinstance(registry, Registry)
    if not isinstance(registry, Registry):
        registry = Registry(out / "registry.sqlite" if registry is None else Path(registry))
    with registry.removed_if_nothing_recorded() if opened_here else nullcontext():  # a failed run leaves none
        runs = evaluate_models(evaluated, suite, registry, eval)
    gate = decide({name: run.results for name, run in runs.items()}, candidate=lineup.candidate.name,
                  base=lineup.base.name, sources=[source.name for source in lineup.sources], policy=policy)
    registry.add_decisions(runs[lineup.candidate.name].model_hash, suite.sha256, gate.policy_sha256, gate.decisions)
    return runs, gate, registry


def report_release(out: Path, planned: Lineup, runs: dict[str, ModelRun], gate: GateResult, suite: Suite,
                   policy: Policy, registry: Registry, *, title: str,
                   current: RolloutPlan | None) -> ReleaseResult:
    """The rollout plan of the gate's decisions, naming the models as `planned` does (a candidate evaluated
    through a server is planned as its folder), and report.md, report.html and rollout.yaml written to `out`."""
    plan = RolloutPlan.from_decisions(gate, {ref.name: PlanModel.from_ref(ref, role)
                                             for ref, role in planned.with_roles()}, suite, policy)
    measured = {name: registry.measurements(run.run_id) for name, run in runs.items()}
    reports = write_reports(out, gate, plan, title=title, policy=policy,
                            costs=cohort_costs({name: run.results for name, run in runs.items()}), current=current,
                            measured=measured)
    return ReleaseResult(out, planned.candidate, gate, plan, runs, reports, measured)


def release(  # noqa: PLR0913  (each is an input a release is made of; its settings are options objects)
        recipe: Recipe | dict | str | Path, suite: Suite | str | Path,
            policy: Policy | dict | str | Path | None, out: str | Path, *, merge: MergeOptions | None = None,
            eval: EvalOptions | None = None, serve: ServeCommand | None = None,
            registry: Registry | str | Path | None = None, candidate_name: str | None = None,
            extra_sources: Sequence[ModelRef] = (),
            current: RolloutPlan | str | Path | None = None) -> ReleaseResult:
    """Merge → evaluate → gate → record → report (`gate_release`'s steps, the candidate merged first).
    `extra_sources` are evaluated and may hold cohorts without being merged (e.g. a LoRA specialist served as
    base + adapter).

    Eleven parameters, each an input of its own: what is merged, on which rows, by which rule, where; how it is
    merged, evaluated and served; the registry, the candidate's name, the unmerged sources and the plan served now.

    `merge` goes to the candidate's merge as given (default MergeOptions(progress=eval.progress)), except
    `overwrite`: the candidate's folder, OUT/candidate, belongs to the release and is replaced when a release is
    run again. `eval` is how every model is evaluated (default EvalOptions()).

    `serve` evaluates the merged candidate through its own server (`evaluated_candidate`, log in
    OUT/candidate-server.log, stopped afterwards however the evaluation ends); the rollout plan names the
    candidate's folder. Every input is checked before the merge: a typo should not cost one."""
    out = Path(out)
    recipe = load_recipe(recipe)
    suite, policy = _checked_suite_and_policy(suite, policy)
    current = _loaded_plan(current)
    eval = eval if eval is not None else EvalOptions()
    if extra_sources:
        check_models(list(extra_sources), eval.endpoint)
    candidate_name = candidate_name or f"merged-{recipe.merge_method}"
    if serve is not None:
        serve.check_rows(candidate_name, suite.rows)
    candidate_dir = out / "candidate"
    merge_candidate(recipe, candidate_dir, merge if merge is not None else MergeOptions(progress=eval.progress))
    models = release_models(recipe, candidate_dir, candidate_name)
    base = next(ref for ref, role in models if role == "base")
    sources = [ref for ref, role in models if role == "source"] + list(extra_sources)
    planned = Lineup(models[0][0], base, tuple(sources))
    with evaluated_candidate(planned.candidate, serve, out / "candidate-server.log") as candidate:
        runs, gate, opened = evaluate_and_decide(replace(planned, candidate=candidate), suite, policy, out,
                                                 eval=eval, registry=registry)
    return report_release(out, planned, runs, gate, suite, policy, opened,
                          title=f"mergegate release: {candidate_name}", current=current)


def _checked_suite_and_policy(suite: Suite | str | Path, policy: Policy | dict | str | Path | None,
                              ) -> tuple[Suite, Policy]:
    """The suite and the policy, loaded, the policy's cohorts checked against the suite's."""
    suite = _loaded_suite(suite)
    policy = load_policy(policy)
    policy.check_cohorts(suite.cohorts)
    return suite, policy


def _loaded_plan(current: RolloutPlan | str | Path | None) -> RolloutPlan | None:
    return current if current is None or isinstance(current, RolloutPlan) else load_plan(current)


def _loaded_suite(suite: Suite | str | Path) -> Suite:
    return suite if isinstance(suite, Suite) else load_suite(suite)


def release_rank(gate: GateResult) -> tuple[int, float]:
    """How good a release is, larger is better: cohorts promoted, then the worst cohort's retention (the
    lowest over cohorts). Never an aggregate mean: a mean can hide one cohort's regression behind another's gain."""
    promoted = sum(d.decision == "promote" for d in gate.decisions)
    return promoted, min((d.retention for d in gate.decisions), default=0.0)
