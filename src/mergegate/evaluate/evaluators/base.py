"""What every evaluator takes and gives: an `Observation` of a model's output and an `EvalResult`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    """What the model produced for a row; `mean_nll` is filled by the runner only when `needs_likelihood(row)`."""

    output: str  # the completion, without the prompt
    mean_nll: float | None = None  # mean per-token NLL of row.expected given what the row asks


@dataclass(frozen=True)
class EvalResult:
    score: float  # in [0, 1]
    passed: bool
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be within [0, 1], got {self.score!r}")


def _verdict(passed: bool, reason: str) -> EvalResult:
    return EvalResult(1.0 if passed else 0.0, passed, reason)


# Quotes, and punctuation that ends or leads a sentence. Not '-', '$', '%' or brackets: they change meaning.
