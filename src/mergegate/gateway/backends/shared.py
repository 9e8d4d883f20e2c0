"""Adapter routes on one shared base: every plan model on a local base (`bases:` in the plan) is a view of one
`SharedBase`, which loads the base once with all its adapters (`evaluate.adapters.load_shared`, PEFT
multi-adapter: never a copy of the base per adapter). A request sets its model's adapter for its generation
(`set_adapter`; a model with no adapter runs the base alone under `disable_adapter()`).

The active adapter is the model's state, so the views share one lock and one queue: one generation at a time on
the base, each with its own adapter, and `queue_limit` waiting callers across all of them (more are shed)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from ..errors import BackendError, BackendOverloaded
from ..protocol import Completion, GenRequest
from .base import Slot
from .local import LocalBackend


class SharedBase:
    """One local base and its adapters (name → folder), loaded once for every view on it (`loads` counts it)."""

    def __init__(self, name: str, path: str | Path, adapters: dict[str, Path], *, queue_limit: int = 64,
                 device: str | None = None):
        self.name, self.path, self.adapters = name, Path(path), dict(adapters)
        self.queue_limit, self.device = queue_limit, device
        self.model: Any = None
        self.tokenizer: Any = None
        self.loads = 0
        self.lock: asyncio.Lock | None = None
        self.pending = 0
        self._loading: asyncio.Future | None = None

    async def start(self) -> None:
        if self._loading is None:  # the first view loads it; the others wait for that same load
            self.lock = asyncio.Lock()
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        await self._loading

    def _load(self) -> None:
        from ...evaluate.adapters import load_shared

        self.model, self.tokenizer = load_shared(self.path, self.adapters, self.device)
        self.loads += 1

    def close(self) -> None:
        self.model = self.tokenizer = None


class AdapterBackend(LocalBackend):
    """A plan model that is `adapter` (None: no adapter, the base alone) on a `SharedBase`."""

    def __init__(self, name: str, shared: SharedBase, adapter: str | None):
        super().__init__(name, shared.path, adapter=shared.adapters.get(adapter) if adapter else None,
                         queue_limit=shared.queue_limit, device=shared.device)
        self.shared, self.adapter_name = shared, adapter

    async def start(self) -> None:
        await self.shared.start()
        self.model, self.tokenizer, self._lock = self.shared.model, self.shared.tokenizer, self.shared.lock

    async def close(self) -> None:
        self.model = self.tokenizer = None
        self.shared.close()

    def describe(self) -> dict:
        return {**super().describe(), "pending": self.shared.pending, "base": self.shared.name,
                "adapter_name": self.adapter_name}

    async def acquire(self) -> Slot:
        """A turn on the shared base (its queue is every view's)."""
        shared = self.shared
        if shared.lock is None or self.model is None:
            raise BackendError(f"model '{self.name}' is not loaded")
        if shared.pending > shared.queue_limit:
            raise BackendOverloaded(f"base '{shared.name}' has {shared.pending} requests in flight or waiting")
        shared.pending += 1
        try:
            await shared.lock.acquire()
        except BaseException:
            shared.pending -= 1
            raise
        return Slot(self._release)

    def _release(self) -> None:
        self.shared.pending -= 1
        assert self.shared.lock is not None, "released before start()"
        self.shared.lock.release()

    def _generate(self, request: GenRequest, emit, cancel: threading.Event) -> Completion:
        from ...evaluate.adapters import use_adapter

        if self.model is None:
            raise BackendError(f"model '{self.name}' is not loaded")
        with use_adapter(self.model, self.adapter_name):  # under the shared lock: no other adapter is active
            return super()._generate(request, emit, cancel)
