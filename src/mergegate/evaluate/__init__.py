"""Evaluation: suites of cases per cohort, evaluators that score outputs, a runner over N models (in one process,
or sharded over Ray workers with `EvalOptions(workers=2)` or `ray_address=...`, CLI `--workers 2` /
`--ray-address`). `EvalOptions` holds every setting of one evaluation, checked once when it is made.

The runner's names (`evaluate_models`, `ModelRun`) import on first use: the runner loads torch, and the
gateway's online checks use the evaluators alone — a remote-only gateway must not pay for torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .evaluators import EVALUATORS, EvalResult, Observation, get_evaluator, score_row
from .options import EvalOptions
from .suite import Suite, SuiteError, SuiteRow, load_suite

__all__ = ["EVALUATORS", "EvalOptions", "EvalResult", "ModelRun", "Observation", "Suite", "SuiteError", "SuiteRow",
           "evaluate_models", "get_evaluator", "load_suite", "score_row"]


def __getattr__(name: str) -> Any:
    if name in ("ModelRun", "evaluate_models"):  # the runner's, loaded with torch on first use
        from . import runner

        globals()[name] = value = getattr(runner, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .runner import ModelRun, evaluate_models
