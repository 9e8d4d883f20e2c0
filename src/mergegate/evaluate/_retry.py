"""When to call an OpenAI-compatible server again: one rule for the endpoint runner and the LLM judge.

Connection errors, timeouts, 429 and 5xx are retried; the wait doubles from `backoff_s` (at most 30 s), and a
server's `Retry-After` (seconds or an HTTP date, at most 60 s) replaces it.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

RETRIED_STATUSES = (429, 500, 502, 503, 504)


def retry_after(value: str | None) -> float | None:
    """A `Retry-After` header in seconds, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def retry_wait(attempt: int, backoff_s: float, retry_after_header: str | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (0 for the first)."""
    asked = retry_after(retry_after_header)
    return min(asked, 60.0) if asked is not None else min(backoff_s * 2 ** attempt, 30.0)
