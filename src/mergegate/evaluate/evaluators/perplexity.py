"""How likely the model finds the expected answer (`perplexity`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import EvalResult, Observation

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


@dataclass(frozen=True)
class Perplexity:
    """How likely the model finds the expected answer: score exp(-mean NLL), passed iff perplexity <= threshold."""

    name: ClassVar[str] = "perplexity"
    version: ClassVar[str] = "1"
    threshold: float = 20.0

    def __post_init__(self) -> None:
        if not self.threshold >= 1.0:
            raise ValueError(f"perplexity threshold must be >= 1 (perplexity never is lower), got {self.threshold!r}")

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        nll = obs.mean_nll
        if nll is None:
            raise ValueError(
                f"row {row.id!r}: 'perplexity' needs Observation.mean_nll; the runner must compute the mean "
                "per-token NLL of row.expected given what the row asks for rows where needs_likelihood(row) is true"
            )
        if not nll >= 0.0:
            raise ValueError(f"row {row.id!r}: mean_nll must be a number >= 0, got {nll!r}")
        perplexity = math.exp(nll) if nll < 700 else math.inf  # exp overflows past ~709
        passed = nll <= math.log(self.threshold)
        reason = f"perplexity {perplexity:.2f} {'<=' if passed else '>'} threshold {self.threshold}"
        return EvalResult(math.exp(-nll), passed, reason)
