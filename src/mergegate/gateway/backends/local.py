"""An in-process transformers model (plus an optional PEFT adapter), one generation at a time.

Generation runs in a worker thread (`asyncio.to_thread`) so the event loop keeps serving; an asyncio lock
serialises calls per model and at most `queue_limit` callers wait behind it (more get `BackendOverloaded`).
Waiting is `acquire` (a `Slot`), separate from generating, so that callers time only the generation.
A cancelled call (timeout, client gone) tells the thread to stop after its current token.

A request the model cannot take (its prompt does not render or tokenize, its seed does not fit torch's RNG)
fails before generation starts with `BackendRejected`: the request's fault, not the model's.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ..errors import BackendError, BackendOverloaded, BackendRejected
from ..protocol import Completion, GenRequest
from .base import Backend, Slot


class LocalBackend(Backend):
    kind = "local"
    provider = "mergegate.local"

    def __init__(self, name: str, path: str | Path, *, adapter: str | Path | None = None, queue_limit: int = 64,
                 device: str | None = None):
        self.name, self.path, self.adapter = name, Path(path), Path(adapter) if adapter else None
        self.queue_limit = queue_limit
        self.device = device  # resolved by load_model: None is cuda when a GPU is available, else cpu
        self.model: Any = None  # loaded by start()
        self.tokenizer: Any = None
        self._lock: asyncio.Lock | None = None
        self._pending = 0

    async def start(self) -> None:
        from ...evaluate.local import load_model
        from ...model_ref import ModelRef

        self._lock = asyncio.Lock()
        ref = ModelRef(self.name, self.path, adapter=self.adapter)
        self.model, self.tokenizer = await asyncio.to_thread(load_model, ref, self.device)

    async def close(self) -> None:
        self.model = self.tokenizer = None

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "adapter": str(self.adapter) if self.adapter else None,
                "loaded": self.model is not None, "pending": self._pending,
                "device": str(self.model.device) if self.model is not None else self.device}

    # -- prompts -----------------------------------------------------------------------------------------
    def render(self, request: GenRequest) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens to it.

        Chat messages go through the tokenizer's chat template when it has one; otherwise they become
        "role: content" lines followed by "assistant:"."""
        if request.operation == "text_completion":
            return request.prompt, True
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                                      add_generation_prompt=True)
            return text, False
        lines = [f"{m['role']}: {m['content']}" for m in request.messages]
        return "\n".join([*lines, "assistant:"]), True

    async def count_prompt_tokens(self, request: GenRequest) -> int:
        return await asyncio.to_thread(self._count_prompt_tokens, request)

    def _count_prompt_tokens(self, request: GenRequest) -> int:
        text, special = self.render(request)
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # -- generation --------------------------------------------------------------------------------------
    async def acquire(self) -> Slot:
        """Wait for this model (not timed by callers: queueing is load, not failure), or refuse at once when
        `queue_limit` callers already wait."""
        if self._lock is None:
            raise BackendError(f"model '{self.name}' is not loaded")
        if self._pending > self.queue_limit:
            raise BackendOverloaded(f"model '{self.name}' has {self._pending} requests in flight or waiting")
        self._pending += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self._pending -= 1
            raise
        return Slot(self._release)

    async def generate(self, request: GenRequest, *, slot: Slot | None = None) -> Completion:
        cancel = threading.Event()
        work = await self._start_work(request, None, cancel, slot)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops after its current token, then releases the model
            raise

    async def stream(self, request: GenRequest, *, slot: Slot | None = None) -> AsyncIterator[str | Completion]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        cancel = threading.Event()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        work = await self._start_work(request, emit, cancel, slot)
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():  # deltas emitted before the thread returned
                    yield queue.get_nowait()
                yield work.result()
                return
        finally:
            cancel.set()  # no await here: a cancelled caller may not be able to wait
            if getter is not None:
                getter.cancel()

    async def _start_work(self, request: GenRequest, emit, cancel: threading.Event,
                          slot: Slot | None) -> asyncio.Future:
        """Generate in a thread, in `slot` (or after waiting for one). The model is released when the thread
        ends — not when the caller stops waiting — so two generations never overlap."""
        if slot is None:
            slot = await self.acquire()
        elif slot.taken:
            raise BackendError(f"model '{self.name}': a slot serves one call")
        release = slot.take()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(self._run, request, emit, cancel))
        except BaseException:
            release()
            raise
        work.add_done_callback(lambda _: release())
        return work

    def _release(self) -> None:
        self._pending -= 1
        assert self._lock is not None, "released before start()"
        self._lock.release()

    def _run(self, request: GenRequest, emit: Callable[[str], None] | None, cancel: threading.Event) -> Completion:
        try:
            return self._generate(request, emit, cancel)
        except BackendError:
            raise
        except Exception as exc:  # a model error is this backend failing, not the gateway
            raise BackendError(f"model '{self.name}' failed: {type(exc).__name__}: {exc}") from exc

    def _generate(self, request: GenRequest, emit, cancel: threading.Event) -> Completion:
        import torch

        if self.model is None:
            raise BackendError(f"model '{self.name}' is not loaded")
        try:
            encoded, options, tracker = self._prepare(request, emit, cancel)
        except Exception as exc:  # before the model runs: this request is what it cannot take
            raise BackendRejected(f"model '{self.name}' cannot take this request: {type(exc).__name__}: "
                                  f"{exc}") from exc
        with torch.no_grad():
            output = self.model.generate(**encoded, **options)
        return tracker.finish(output[0, encoded["input_ids"].shape[1]:].tolist())

    def _prepare(self, request: GenRequest, emit, cancel: threading.Event):
        """The prompt tokenized, generate()'s options and the tracker for one request (seeds the RNG)."""
        import torch
        from transformers import StoppingCriteriaList

        params = request.params
        text, special = self.render(request)
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=special).to(self.model.device)
        prompt_len = encoded["input_ids"].shape[1]
        tracker = TextTracker(self.tokenizer, prompt_len, params.stop, cancel, emit)
        options = dict(max_new_tokens=params.max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                       eos_token_id=self.tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([tracker]))
        if params.greedy:
            options.update(do_sample=False)
        else:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0, top_k=0)
            if params.seed is not None:
                torch.manual_seed(params.seed)  # process-wide RNG: reproducible only without concurrent sampling
        return encoded, options, tracker


class TextTracker:
    """Watches generation token by token: decodes the text so far, stops at a stop sequence or on cancel,
    and emits text deltas — holding back a tail that could still become a stop sequence."""

    def __init__(self, tokenizer, prompt_len: int, stops: tuple[str, ...], cancel: threading.Event,
                 emit: Callable[[str], None] | None):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops
        self.cancel, self.emit = cancel, emit
        self.emitted = ""
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self._decode(input_ids[0, self.prompt_len:].tolist())
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            self._emit_upto(text[:cut])
        else:
            self._emit_upto(held_back(text, self.stops))
        done = self.stopped or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def finish(self, new_ids: list[int]) -> Completion:
        eos = self.tokenizer.eos_token_id
        ended = eos in new_ids
        used = new_ids[: new_ids.index(eos) + 1] if ended else new_ids
        text = self._decode(used)
        cut = first_stop(text, self.stops)
        if cut is not None:
            text = text[:cut]
        self._emit_upto(text)
        reason = "stop" if ended or cut is not None else "length"
        return Completion(text=text, prompt_tokens=self.prompt_len, completion_tokens=len(used), finish_reason=reason)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit_upto(self, text: str) -> None:
        if self.emit is not None and len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.emit(text[len(self.emitted):])
            self.emitted = text


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop sequence in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> str:
    """`text` without a tail that is the start of a stop sequence, or an incomplete UTF-8 character."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    text = text[:keep]
    return text.rstrip("\ufffd")
