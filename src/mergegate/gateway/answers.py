"""What answering a request yields, shared by the plain path (dispatch.py), the strategies (ensembles.py) and the
API: an answer, the models skipped on the way to it and why, and a stream with a model committed to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from .protocol import Completion


@dataclass(frozen=True)
class Skip:
    """A model in the chain that did not answer: why (a metrics label) and the detail."""

    model: str
    reason: str  # circuit_open | timeout | unavailable | http_error | bad_response | overloaded | rejected |
    #              loop | internal | check:NAME
    detail: str


@dataclass
class Answer:
    model: str
    completion: Completion
    attempt: int
    checks: dict
    skipped: list[Skip]


@dataclass
class StreamStart:
    """A stream that has a model committed to it: `events` yields text deltas, then the final Completion."""

    model: str
    attempt: int
    skipped: list[Skip]
    events: AsyncIterator[str | Completion]
    buffered: bool = False
    checks: dict = field(default_factory=dict)
