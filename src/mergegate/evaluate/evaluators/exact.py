"""Exact and normalized match against the row's expected answer."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import EvalResult, Observation, _verdict

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


_EDGE = "\"'`‘’“”«».,;:!?"


def _normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, surrounding quotes and sentence punctuation removed."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(_EDGE + " ")


@dataclass(frozen=True)
class ExactMatch:
    """The output is the expected text, ignoring surrounding whitespace only."""

    name: ClassVar[str] = "exact_match"
    version: ClassVar[str] = "1"

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        if obs.output.strip() == row.expected.strip():
            return _verdict(True, "exact match")
        return _verdict(False, f"expected {row.expected.strip()!r}, got {obs.output.strip()!r}")


@dataclass(frozen=True)
class NormalizedMatch:
    """The output matches the expected text up to case, Unicode form, spacing and surrounding punctuation."""

    name: ClassVar[str] = "normalized_match"
    version: ClassVar[str] = "1"

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        got, expected = _normalize(obs.output), _normalize(row.expected)
        if got == expected:
            return _verdict(True, "match after normalization")
        return _verdict(False, f"expected {expected!r}, got {got!r} (normalized)")
