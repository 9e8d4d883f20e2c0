"""Plain helpers the gateway tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import time

MESSAGES = [{"role": "user", "content": "hello there"}]


def route_of(headers) -> dict[str, str]:
    """x-mergegate-route → {key: value}."""
    return dict(part.strip().split("=", 1) for part in headers["x-mergegate-route"].split(";"))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
