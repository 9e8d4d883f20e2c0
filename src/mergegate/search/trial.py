"""One search trial, as a Ray task runs it: merge the drawn recipe into a scratch folder, evaluate the candidate
on the dev rows, and hand the rows back. The driver (search.run) is the only writer of the registry and the
study; a trial writes nothing but its scratch folder and a throwaway registry beside it.

Pruning: with `stop_below` set, cohorts are evaluated one at a time and each is decided at once (the gate's own
rule against the sources' results the driver passed in). When even promoting every cohort still to come could
not reach `stop_below` promoted cohorts — the best trial's count so far — the trial stops: it can no longer
rank first, whatever its remaining rows say. Sound for the gate objective's first key only; the cost is one
model load per cohort, so a search on large in-process models may prefer to turn it off.
"""

from __future__ import annotations

import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluate.options import EvalOptions
from ..model_ref import ModelRef
from ..registry import RowResult

if TYPE_CHECKING:
    from ..evaluate.suite import Suite
    from ..gate import Policy
    from ..pipeline import ServeCommand


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs, picklable: the recipe as YAML text and the folder its paths are relative to."""

    number: int
    recipe_yaml: str
    recipe_folder: str | None
    folder: str  # where the candidate is merged
    dev_suite: Suite  # the dev rows
    candidate: str  # the candidate's name in the results
    base: str
    sources: tuple[str, ...]
    source_results: dict[str, list[RowResult]]  # base and sources on the dev rows (for pruning)
    policy: Policy
    seed: int = 0
    eval: EvalOptions = field(default_factory=lambda: EvalOptions(threads=1, progress=False))  # its threads merge too
    stop_below: int | None = None  # prune once this many promoted cohorts are out of reach
    serve: ServeCommand | None = None  # evaluate the merged folder through its own server


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    status: str  # "complete", "pruned" or "failed"
    results: list[RowResult] = field(default_factory=list)  # every dev row when complete
    model_hash: str | None = None
    config: dict | None = None  # the evaluation's run config (the registry's cache key)
    reason: str | None = None  # why it failed or was pruned
    merge_s: float = 0.0
    evaluate_s: float = 0.0


def policy_for(policy: Any, cohorts: list[str]) -> Any:
    """The policy's rules for `cohorts` alone: what `gate.decide` needs for a trial's results on some cohorts
    (a pruned trial's, or one cohort's as it finishes)."""
    rules = {name: rule for name, rule in policy.cohorts.items() if name in cohorts}
    route = policy.default_route if policy.default_route in cohorts else None
    return policy.model_copy(update={"cohorts": rules, "default_route": route})


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Merge and evaluate one trial. A refused recipe, a failed merge or evaluation is an outcome, not an
    exception: the search records the reason and goes on."""
    from ..errors import MergegateError

    try:
        return _run(spec)
    except MergegateError as exc:
        return TrialOutcome(spec.number, "failed", reason=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 — a trial's crash is recorded with its reason; the search goes on
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
        return TrialOutcome(spec.number, "failed", reason=f"{type(exc).__name__}: {exc}{where}")


def _run(spec: TrialSpec) -> TrialOutcome:
    import torch

    from ..engine import MergeOptions, merge
    from ..evaluate import evaluate_models
    from ..evaluate.local import run_config
    from ..evaluate.suite import Suite
    from ..gate import decide
    from ..recipe import load_recipe
    from ..registry import Registry

    threads = spec.eval.threads or 1
    torch.set_num_threads(threads)
    recipe = load_recipe(spec.recipe_yaml, folder=spec.recipe_folder or None)
    folder = Path(spec.folder)
    started = time.perf_counter()
    merge(recipe, folder, MergeOptions(seed=spec.seed, progress=False, overwrite=True, workers=threads))
    merged = time.perf_counter()
    suite = spec.dev_suite
    scratch = folder.parent / f".{folder.name}-eval.sqlite"
    scratch.unlink(missing_ok=True)
    registry = Registry(scratch)
    results: list[RowResult] = []
    try:
        with ExitStack() as stack:
            ref = ModelRef(spec.candidate, folder)
            if spec.serve is not None:
                from ..candidate_server import served_candidate

                url = stack.enter_context(served_candidate(spec.serve.template, folder.absolute(), spec.candidate,
                                                           folder.parent / f"{folder.name}-server.log",
                                                           timeout_s=spec.serve.timeout_s))
                ref = ModelRef(spec.candidate, url=url, served_model=spec.candidate)
            # Pruning needs a decision per cohort as it finishes: evaluate cohort by cohort. Otherwise (or through
            # a server, whose run config is the server's) one pass.
            by_cohort = spec.stop_below is not None and spec.serve is None
            parts = ([Suite(suite.path, tuple(suite.by_cohort(c)), f"{suite.sha256}:{c}") for c in suite.cohorts]
                     if by_cohort else [suite])
            promoted = 0
            for done, part in enumerate(parts, start=1):
                run = evaluate_models([(ref, "candidate")], part, registry, spec.eval)[spec.candidate]
                results += run.results
                model_hash = run.model_hash
                # the whole dev suite's config (a cohort's part names only its own evaluators)
                config = run_config(ref, suite, max_new_tokens=spec.eval.max_new_tokens,
                                    device=spec.eval.resolved_device) if by_cohort else registry.run_config(run.run_id)
                if not by_cohort or spec.stop_below is None:
                    continue
                cohort = part.rows[0].cohort
                gate = decide({spec.candidate: run.results, **spec.source_results}, candidate=spec.candidate,
                              base=spec.base, sources=list(spec.sources), policy=policy_for(spec.policy, [cohort]))
                promoted += sum(d.decision == "promote" for d in gate.decisions)
                if promoted + (len(parts) - done) < spec.stop_below:
                    return TrialOutcome(spec.number, "pruned", results, model_hash, config,
                                        reason=f"pruned after {cohort}: at most {promoted + len(parts) - done} "
                                               f"cohort(s) can be promoted, the best trial has {spec.stop_below}",
                                        merge_s=merged - started, evaluate_s=time.perf_counter() - merged)
    finally:
        registry.close()
        scratch.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{scratch}{suffix}").unlink(missing_ok=True)
    return TrialOutcome(spec.number, "complete", results, model_hash, config, merge_s=merged - started,
                        evaluate_s=time.perf_counter() - merged)
