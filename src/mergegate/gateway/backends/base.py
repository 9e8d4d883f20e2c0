"""The one interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import AsyncIterator

from ..protocol import Completion, GenRequest


class Backend(ABC):
    """A model the gateway can call.

    `generate` returns one `Completion`. `stream` yields text deltas (str) and, last, the `Completion` for the
    whole answer (its usage and finish reason). Both raise `BackendError` subclasses on failure.
    """

    name: str
    kind: str  # "local" | "remote"
    provider: str  # OpenTelemetry gen_ai.provider.name

    async def start(self) -> None:
        """Load the model / open connections. Called once, inside the server's event loop."""

    async def close(self) -> None:
        """Release what `start` acquired."""

    @abstractmethod
    async def generate(self, request: GenRequest) -> Completion: ...

    @abstractmethod
    def stream(self, request: GenRequest) -> AsyncIterator[str | Completion]: ...

    @abstractmethod
    def count_prompt_tokens(self, request: GenRequest) -> int:
        """Tokens the prompt will take (exact for local models, an estimate for remote ones)."""

    def describe(self) -> dict:
        return {"kind": self.kind, "provider": self.provider}
