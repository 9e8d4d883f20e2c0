"""A circuit breaker per backend: closed → (K consecutive failures) → open → (cooldown) → half-open, where
one probe call is let through; its success closes the breaker, its failure opens it again."""

from __future__ import annotations

import time
from typing import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # for the /metrics gauge


class CircuitBreaker:
    def __init__(self, failures: int = 3, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown, self.clock = failures, cooldown, clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.times_opened = 0
        self._probing = False

    def allow(self) -> bool:
        """May a call go to this backend now? In half-open, only one probe at a time."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.state, self.consecutive_failures, self._probing = CLOSED, 0, False

    def failure(self) -> None:
        self.consecutive_failures += 1
        self._probing = False
        if self.state == HALF_OPEN or self.consecutive_failures >= self.threshold:
            if self.state != OPEN:
                self.times_opened += 1
            self.state, self.opened_at = OPEN, self.clock()

    def release(self) -> None:
        """The call ended without saying anything about health (overloaded, cancelled): free the probe slot."""
        self._probing = False

    def snapshot(self) -> dict:
        state = self.state
        if state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            state = HALF_OPEN  # would let a probe through now
        return {"state": state, "consecutive_failures": self.consecutive_failures, "times_opened": self.times_opened}
