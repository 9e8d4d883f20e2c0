"""The one interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import AsyncIterator, Callable

from ..protocol import Completion, GenRequest


class Slot:
    """A backend's capacity reserved for one call (see `Backend.acquire`).

    The call that uses it `take`s the release (and frees the capacity when it really ends); `release` frees it
    when no call took it. Both are safe to repeat: only the first release does anything."""

    def __init__(self, release: Callable[[], None] | None = None):
        self._release = release
        self.taken = False

    def take(self) -> Callable[[], None]:
        release, self._release, self.taken = self._release, None, True
        return release or _nothing

    def release(self) -> None:
        self.take()()


def _nothing() -> None:
    pass


class Backend(ABC):
    """A model the gateway can call.

    `generate` returns one `Completion`. `stream` yields text deltas (str) and, last, the `Completion` for the
    whole answer (its usage and finish reason). Both raise `BackendError` subclasses on failure.

    A caller that times calls first waits for a `Slot` (`acquire`): time spent there is load — a busy local
    model's queue — not a sign of ill health, so it does not count toward the call's timeout. A call given no
    slot acquires its own.
    """

    name: str
    kind: str  # "local" | "remote"
    provider: str  # OpenTelemetry gen_ai.provider.name

    async def start(self) -> None:  # noqa: B027  (a hook: a backend with nothing to start keeps the no-op)
        """Load the model / open connections. Called once, inside the server's event loop."""

    async def close(self) -> None:  # noqa: B027  (a hook, as start)
        """Release what `start` acquired."""

    async def acquire(self) -> Slot:
        """Wait for capacity to take one call; raise `BackendOverloaded` when too many already wait.
        The default: no queue."""
        return Slot()

    @abstractmethod
    async def generate(self, request: GenRequest, *, slot: Slot | None = None) -> Completion: ...

    @abstractmethod
    def stream(self, request: GenRequest, *, slot: Slot | None = None) -> AsyncIterator[str | Completion]: ...

    @abstractmethod
    async def count_prompt_tokens(self, request: GenRequest) -> int:
        """Tokens the prompt will take (exact for local models, an estimate for remote ones). Never on the event
        loop's time: tokenizing a long prompt takes a while."""

    def describe(self) -> dict:
        return {"kind": self.kind, "provider": self.provider}
