"""One way to wait until a server is ready: ask `is_ready` every `interval_s` until it says yes, while `gone` says
nothing (a server that has stopped will never be ready), for at most `timeout_s`."""

from __future__ import annotations

import time
from typing import Callable


class NotReady(Exception):
    """The server did not get ready: `stopped` is why when it stopped first, None when the time ran out."""

    def __init__(self, stopped: str | None):
        self.stopped = stopped
        super().__init__(stopped or "not ready in time")


def await_ready(is_ready: Callable[[], bool], timeout_s: float, *, gone: Callable[[], str | None] = lambda: None,
                interval_s: float = 0.25) -> None:
    """Return once `is_ready()`; NotReady when `gone()` names why the server stopped, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        stopped = gone()
        if stopped is not None:
            raise NotReady(stopped)
        if is_ready():
            return
        if time.monotonic() > deadline:
            raise NotReady(None)
        time.sleep(interval_s)


def lists_model(base_url: str, name: str, *, timeout_s: float = 5.0) -> Callable[[], bool]:
    """A readiness check: the server at `base_url` answers `GET /models` (one try) and lists `name`."""
    from .bounds import AnswerTooLarge
    from .client import MODELS, Settings, Unanswered, call_blocking, model_entries

    settings = Settings(base_url, timeout_s)

    def check() -> bool:
        import httpx

        try:
            reply = call_blocking(settings, MODELS)
            return reply.status_code == 200 and any(entry.get("id") == name for entry in model_entries(reply))
        except (Unanswered, AnswerTooLarge, httpx.HTTPError, ValueError):
            return False

    return check
