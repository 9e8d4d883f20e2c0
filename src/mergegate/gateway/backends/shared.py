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
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, BackendOverloaded
from ..protocol import Completion, GenRequest
from .base import Slot
from .local import LocalBackend

if TYPE_CHECKING:  # the router's module loads torch: only a plan with a router needs it
    from ...evaluate.adapter_router import AdapterRouter


class SharedBase:
    """One local base and its adapters (name → folder), loaded once for every view on it (`loads` counts it)."""

    def __init__(self, name: str, path: str | Path, adapters: dict[str, Path] | None = None, *,
                 queue_limit: int = 64, device: str | None = None):
        self.name, self.path = name, Path(path)
        self.adapters: dict[str, Path] = {}
        for adapter_name, folder in (adapters or {}).items():
            self.add(adapter_name, folder)
        self.queue_limit, self.device = queue_limit, device
        self.model: Any = None
        self.tokenizer: Any = None
        self.loads = 0
        self.lock: asyncio.Lock | None = None
        self.pending = 0
        self._loading: asyncio.Future | None = None

    def add(self, name: str, folder: Path) -> str:
        """Load the adapter at `folder` under `name` with the base (before `start`); the name it is loaded
        under, an earlier one when the same folder is already added (one copy of each adapter)."""
        folder = Path(folder)
        same = next((known for known, path in self.adapters.items() if path.resolve() == folder.resolve()), None)
        if same is not None:
            return same
        self.adapters[name] = folder
        return name

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
    """A plan model that is `adapter` (None: no adapter, the base alone) on a `SharedBase`; or, with a `router`
    (`evaluate.adapter_router`), the adapter the router picks from each request's prompt."""

    def __init__(self, name: str, shared: SharedBase, adapter: str | None, router: AdapterRouter | None = None):
        super().__init__(name, shared.path, adapter=shared.adapters.get(adapter) if adapter else None,
                         queue_limit=shared.queue_limit, device=shared.device)
        self.shared, self.adapter_name, self.router = shared, adapter, router
        # the router's choices as the shared base loaded them (one copy of an adapter several models name)
        self._loaded_as = {choice: shared.add(f"{name}/{choice}", folder)
                           for choice, folder in (router.adapters.items() if router is not None else ())}

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
        adapter = self.adapter_name if self.router is None else self._routed(request)
        with use_adapter(self.model, adapter):  # under the shared lock: no other adapter is active
            return super()._generate(request, emit, cancel)

    def _routed(self, request: GenRequest) -> str | None:
        """The loaded adapter the router picks for the request's prompt (None: the base alone)."""
        from ...evaluate.adapters import prompt_features

        assert self.router is not None
        text, special = self.render(request)
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        choice = self.router.pick(prompt_features(self.model, [ids], self.tokenizer.pad_token_id))[0]
        return None if choice is None else self._loaded_as[choice]
