"""Evaluation: suites of cases per cohort, evaluators that score outputs, a runner over N models (in one process,
or sharded over Ray workers with `workers=2` / `ray_address=...`, CLI `--workers 2` / `--ray-address`)."""

from .evaluators import EVALUATORS, EvalResult, Observation, get_evaluator, score_row
from .runner import ModelRun, evaluate_models
from .suite import Suite, SuiteError, SuiteRow, load_suite

__all__ = ["EVALUATORS", "EvalResult", "ModelRun", "Observation", "Suite", "SuiteError", "SuiteRow",
           "evaluate_models", "get_evaluator", "load_suite", "score_row"]
