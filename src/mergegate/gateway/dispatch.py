"""Answer a routed request: try the route's models in order (route.model, then route.fallback), skipping any
whose circuit breaker is open, falling over on errors, timeouts and failed online checks. A route with a
`strategy` is answered by the strategy runner the gateway gives the dispatcher (ensembles.py), through the same
per-model `attempt`.

What counts toward a backend's breaker: errors and timeouts. An answer that fails its online check is a
quality problem, not a health one: it triggers fallback but counts as a success for the breaker. A full
local queue (`overloaded`) and a request the backend refuses as invalid (`rejected`) trigger fallback and
count as neither. When no model could take the request: 400 if a model rejected it (and none failed), 429
with Retry-After if one was overloaded (shedding load), 503 if every breaker was open, 508 if a url model led back
to a gateway the request already passed through (hops.py), else 502.

Timeouts (`backend_timeout`) count from when a backend starts on the call: a call first waits for the
backend's capacity (`Backend.acquire`, a busy local model's queue), untimed, since queueing is load, not
failure. A non-streamed call must end within the timeout; a stream must send its first token within it and
then never go quiet for longer (a stream that keeps sending may run longer, up to the optional
`stream_max_duration`).

Streaming: on routes whose check can fail an answer, the answer is generated whole, checked, then sent as
chunks ("buffered"). Elsewhere it streams as generated; the gateway falls over only until the first chunk
arrives, since after that the caller has part of one model's answer — a later failure ends the stream with
an error event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from .answers import Answer, Skip, StreamStart
from .breaker import OPEN, CircuitBreaker
from .checks import can_fail, failed_check, run_checks
from .config import GatewayConfig
from .errors import APIError, BackendBadResponse, BackendError, BackendTimeout
from .protocol import Completion, GenRequest
from .routing import Target

RETRY_AFTER = 1  # seconds, on a 429 when every model that could answer was busy
# answers a route with a strategy (ensembles.run_strategy): the dispatcher, the target, the request, the parent span
StrategyRunner = Callable[["Dispatcher", Target, GenRequest, Any], Awaitable[Answer]]


class Dispatcher:
    def __init__(self, backends: dict, breakers: dict[str, CircuitBreaker], telemetry, metrics,
                 config: GatewayConfig, *, run_strategy: StrategyRunner):
        self.backends, self.breakers = backends, breakers
        self.telemetry, self.metrics, self.config = telemetry, metrics, config
        self.run_strategy = run_strategy

    async def complete(self, target: Target, request: GenRequest, parent=None) -> Answer:
        if target.route.strategy is not None and not target.pinned:
            return await self.run_strategy(self, target, request, parent)
        skipped: list[Skip] = []
        for attempt, name in enumerate(target.chain):
            answer = await self.attempt(target, request, name, attempt, parent, skipped)
            if answer is not None:
                return answer
        raise self._exhausted(target, skipped)

    async def attempt(self, target: Target, request: GenRequest, name: str, attempt: int, parent,
                      skipped: list[Skip], *, answered: list[Answer] | None = None) -> Answer | None:
        """One model's try at a non-streamed answer: the Answer, or None with the reason appended to `skipped`.
        `answered`, when given, also receives an answer that failed its check (ensembles count its tokens)."""
        if not self._admit(target, name, skipped):
            return None
        backend, call = self.backends[name], self._call(target, request, name, attempt, parent, stream=False)
        slot = None
        try:
            slot = await backend.acquire()  # the queue: not timed
            completion = await asyncio.wait_for(backend.generate(request, slot=slot),
                                                self.config.backend_timeout)
        except (BackendError, asyncio.TimeoutError) as exc:
            self._failed(target, name, self._as_backend_error(name, exc), call, skipped)
            return None
        except BaseException:
            self.breakers[name].release()
            call.fail("cancelled", "the request was cancelled")
            raise
        finally:
            if slot is not None:
                slot.release()  # no-op when the call took it (it frees the model when generation ends)
        self.breakers[name].success()
        checks = run_checks(target.route, completion.text)
        failed = failed_check(target.route, checks, fallback_on_refusal=self.config.fallback_on_refusal)
        call.succeed(completion, checks, failed)
        if failed:
            if answered is not None:
                answered.append(Answer(name, completion, attempt, checks, []))
            self._skip(target, skipped, Skip(name, f"check:{failed}", checks[failed]["reason"]))
            return None
        return Answer(name, completion, attempt, checks, skipped)

    async def open_stream(self, target: Target, request: GenRequest, parent=None) -> StreamStart:
        if can_fail(target.route, fallback_on_refusal=self.config.fallback_on_refusal) or \
                (target.route.strategy is not None and not target.pinned):  # a strategy picks among whole answers
            answer = await self.complete(target, request, parent)
            start = StreamStart(answer.model, answer.attempt, answer.skipped, _replay(answer.completion), True,
                                answer.checks)
            return start
        skipped: list[Skip] = []
        for attempt, name in enumerate(target.chain):
            if not self._admit(target, name, skipped):
                continue
            backend, call = self.backends[name], self._call(target, request, name, attempt, parent, stream=True)
            slot = events = None
            try:
                slot = await backend.acquire()  # the queue: not timed
                events = backend.stream(request, slot=slot)
                started = time.monotonic()
                first = await asyncio.wait_for(anext(events), self.config.backend_timeout)
                call.first_chunk()
            except (BackendError, asyncio.TimeoutError, StopAsyncIteration) as exc:
                await self._abandon(events, slot)
                self._failed(target, name, self._as_backend_error(name, exc, "first"), call, skipped)
                continue
            except BaseException:
                self.breakers[name].release()
                call.fail("cancelled", "the request was cancelled")
                await self._abandon(events, slot)
                raise
            start = StreamStart(name, attempt, skipped, _empty())
            start.events = self._rest(start, target, first, events, slot, call, started)
            return start
        raise self._exhausted(target, skipped)

    async def _rest(self, start: StreamStart, target: Target, first, events, slot, call, started: float):
        name, breaker = start.model, self.breakers[start.model]
        idle, cap = self.config.backend_timeout, self.config.stream_max_duration
        settled = False
        try:
            item = first
            while True:
                if isinstance(item, Completion):
                    breaker.success()
                    settled = True
                    start.checks = run_checks(target.route, item.text)
                    call.succeed(item, start.checks)
                    yield item
                    return
                yield item
                wait, what = idle, "gap"
                if cap is not None and started + cap - time.monotonic() < idle:
                    wait, what = max(0.0, started + cap - time.monotonic()), "total"
                try:
                    item = await asyncio.wait_for(anext(events), wait)
                except (BackendError, asyncio.TimeoutError, StopAsyncIteration) as exc:
                    error = self._as_backend_error(name, exc, what)
                    settled = True
                    self._record_health(name, error)
                    call.fail(error.error_type, str(error))
                    self.metrics.fallbacks.inc(target.cohort, name, f"stream_{error.kind}")
                    raise error from None
        finally:
            if not settled:
                breaker.release()
                call.fail("cancelled", "the stream was closed before it ended")
            await self._abandon(events, slot)

    @staticmethod
    async def _abandon(events, slot) -> None:
        if events is not None:
            await close_stream(events)
        if slot is not None:
            slot.release()

    # -- helpers -----------------------------------------------------------------------------------------
    def _admit(self, target: Target, name: str, skipped: list[Skip]) -> bool:
        if self.breakers[name].allow():
            return True
        self._skip(target, skipped, Skip(name, "circuit_open", "circuit breaker open: skipped during its cooldown"))
        return False

    def _call(self, target: Target, request: GenRequest, name: str, attempt: int, parent, stream: bool):
        route = "pinned" if target.pinned else target.cohort
        return self.telemetry.call(request, self.backends[name], cohort=target.cohort, route=route, attempt=attempt,
                                   fallback=target.is_fallback(attempt), stream=stream, parent=parent)

    def _as_backend_error(self, name: str, exc: BaseException, what: str = "answer") -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, StopAsyncIteration):
            return BackendBadResponse(f"model '{name}' ended its stream without a final answer")
        if what == "total":
            capped = BackendTimeout(f"model '{name}' was still streaming after stream_max_duration "
                                    f"({self.config.stream_max_duration} s)")
            capped.counts_as_failure = False  # a policy cut on a stream that was still flowing, not ill health
            return capped
        waited = {"answer": "did not answer", "first": "sent no first token",
                  "gap": "sent nothing more"}[what]
        return BackendTimeout(f"model '{name}' {waited} within {self.config.backend_timeout} s")

    def _failed(self, target: Target, name: str, error: BackendError, call, skipped: list[Skip]) -> None:
        self._record_health(name, error)
        call.fail(error.error_type, str(error))
        self._skip(target, skipped, Skip(name, error.kind, str(error)))

    def _record_health(self, name: str, error: BackendError) -> None:
        breaker = self.breakers[name]
        if not error.counts_as_failure:
            breaker.release()
            return
        was_open = breaker.state == OPEN
        breaker.failure()
        if breaker.state == OPEN and not was_open:
            self.metrics.breaker_transitions.inc(name)

    def _skip(self, target: Target, skipped: list[Skip], skip: Skip) -> None:
        skipped.append(skip)
        self.metrics.fallbacks.inc(target.cohort, skip.model, skip.reason)

    @staticmethod
    def _exhausted(target: Target, skipped: list[Skip]) -> APIError:
        tried = "; ".join(f"{s.model}: {s.reason} ({s.detail})" for s in skipped)
        message = f"No model could answer cohort '{target.cohort}' (tried {len(skipped)}): {tried}"
        reasons = {s.reason for s in skipped}
        if "rejected" in reasons and reasons <= {"rejected", "circuit_open", "overloaded"}:
            first = next(s for s in skipped if s.reason == "rejected")
            return APIError(400, f"The request was refused as invalid: {first.detail}", param=None,
                            code="invalid_request")
        if "overloaded" in reasons and reasons <= {"circuit_open", "overloaded"}:
            return APIError(429, f"{message}. Retry after {RETRY_AFTER} s.", type="server_error",
                            code="overloaded", headers={"Retry-After": str(RETRY_AFTER)})
        if reasons <= {"circuit_open"}:
            return APIError(503, message, type="server_error", code="no_backend_available")
        if "loop" in reasons and reasons <= {"loop", "circuit_open", "overloaded"}:
            return APIError(508, f"{message}. A url model of this route leads back to a gateway the request already "
                                 "passed through.", type="server_error", code="loop_detected")
        return APIError(502, message, type="server_error", code="all_backends_failed")


async def _replay(completion: Completion) -> AsyncIterator[str | Completion]:
    if completion.text:
        yield completion.text
    yield completion


async def _empty() -> AsyncIterator[str | Completion]:
    return
    yield  # pragma: no cover


async def close_stream(events) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # the stream already failed; its error was recorded
            pass
