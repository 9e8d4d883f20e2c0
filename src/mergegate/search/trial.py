"""One search trial, as a Ray task runs it: the release pipeline's steps on the drawn recipe — merge it into a
scratch folder (`pipeline.merge_candidate`), evaluate the candidate as it is or through its own server
(`pipeline.evaluated_candidate`) on the dev rows — and hand the rows back. The driver (search.run) is the only
writer of the registry and the study; a trial writes nothing but its scratch folder and a throwaway registry
beside it.

Pruning: with `stop_below` set, the dev rows are evaluated one cohort at a time (`evaluate_by_cohort`: one run of
the dev suite) and each cohort is decided at once (`gate.decide`, the policy's rule for that cohort, against the
sources' results the driver passed in). When even promoting every cohort still to come could not reach
`stop_below` promoted cohorts — the best trial's count so far — the trial stops: it can no longer rank first,
whatever its remaining rows say. Sound for the gate objective's first key only; the cost is one model load per
cohort, so a search on large in-process models may prefer to turn it off.
"""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..evaluate.options import EvalOptions
from ..model_ref import ModelRef
from ..registry import RowResult

if TYPE_CHECKING:
    from ..evaluate.suite import Suite
    from ..gate import Policy
    from ..pipeline import ServeCommand
    from ..registry import Registry


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

    from ..engine import MergeOptions
    from ..evaluate.runner import evaluate_by_cohort, evaluate_models
    from ..gate import decide
    from ..pipeline import evaluated_candidate, merge_candidate
    from ..recipe import load_recipe

    threads = spec.eval.threads or 1
    torch.set_num_threads(threads)
    recipe = load_recipe(spec.recipe_yaml, folder=spec.recipe_folder or None)
    folder = Path(spec.folder)
    started = time.perf_counter()
    merge_candidate(recipe, folder, MergeOptions(seed=spec.seed, progress=False, workers=threads))
    merged = time.perf_counter()

    def outcome(status: str, run: Any, registry: Any, reason: str | None = None) -> TrialOutcome:
        return TrialOutcome(spec.number, status, run.results, run.model_hash, registry.run_config(run.run_id),
                            reason=reason, merge_s=merged - started, evaluate_s=time.perf_counter() - merged)

    candidate = ModelRef(spec.candidate, folder)
    with _scratch_registry(folder) as registry, \
            evaluated_candidate(candidate, spec.serve, folder.parent / f"{folder.name}-server.log") as evaluated:
        # Pruning needs a decision per cohort as it finishes: one run of the dev rows, cohort by cohort. A served
        # candidate is evaluated in one pass.
        if spec.stop_below is None or spec.serve is not None:
            run = evaluate_models([(evaluated, "candidate")], spec.dev_suite, registry, spec.eval)[spec.candidate]
            return outcome("complete", run, registry)
        cohorts, promoted = spec.dev_suite.cohorts, 0
        for done, (cohort, run) in enumerate(evaluate_by_cohort((evaluated, "candidate"), spec.dev_suite, registry,
                                                                spec.eval), start=1):
            gate = decide({spec.candidate: [r for r in run.results if r.cohort == cohort], **spec.source_results},
                          candidate=spec.candidate, base=spec.base, sources=list(spec.sources),
                          policy=spec.policy.for_cohorts([cohort]))
            promoted += sum(d.decision == "promote" for d in gate.decisions)
            reachable = promoted + len(cohorts) - done
            if reachable < spec.stop_below:
                return outcome("pruned", run, registry, f"pruned after {cohort}: at most {reachable} cohort(s) can be "
                                                        f"promoted, the best trial has {spec.stop_below}")
        return outcome("complete", run, registry)


@contextmanager
def _scratch_registry(folder: Path) -> Iterator[Registry]:
    """A throwaway registry beside the trial's folder, removed (with its journal files) however the trial ends."""
    from ..registry import Registry

    scratch = folder.parent / f".{folder.name}-eval.sqlite"
    scratch.unlink(missing_ok=True)
    registry = Registry(scratch)
    try:
        yield registry
    finally:
        registry.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{scratch}{suffix}").unlink(missing_ok=True)
