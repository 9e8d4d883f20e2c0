"""Shadow traffic: a route's `mirror` share of requests is also sent to the plan's candidate, in the background.

Sampling is deterministic: a request is mirrored when the hash of its id falls below the share. At most
`limit` mirrored calls are in flight; a request arriving when all slots are busy is dropped (counted in
`mergegate_mirror_total{outcome="dropped"}`), never queued, so mirroring cannot build up a backlog. The caller
always gets the primary's answer; both outputs and their online checks go to the registry (`record_mirror`).
Mirrored calls skip the circuit breakers: shadow traffic does not steer live routing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Callable

from .checks import run_checks
from .errors import BackendError
from .protocol import GenRequest
from .routing import Target


def sampled(request_id: str, share: float) -> bool:
    if share <= 0:
        return False
    if share >= 1:
        return True
    point = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2 ** 64
    return point < share


class Mirror:
    def __init__(self, *, registry, backends: dict, telemetry, metrics, limit: int, timeout: float):
        self.registry, self.backends, self.telemetry, self.metrics = registry, backends, telemetry, metrics
        self.limit, self.timeout = limit, timeout
        self.in_flight = 0
        # called with each recorded pair (the gateway's live controller, when there is one)
        self.on_pair: Callable[..., None] | None = None
        self._tasks: set[asyncio.Task] = set()

    def submit(self, *, candidate: str, target: Target, request_id: str, request: GenRequest, primary_model: str,
               primary_text: str, primary_checks: dict) -> str | None:
        """Start a mirrored call if this request is sampled; returns "sent", "dropped" or None (not mirrored).
        The call goes to the route's `mirror_to` when it names a model (a live test's reverse shadow), else to
        `candidate`."""
        candidate = target.route.mirror_to or candidate
        if target.pinned or primary_model == candidate or candidate not in self.backends:
            return None
        if not sampled(request_id, target.route.mirror):
            return None
        if self.in_flight >= self.limit:
            self.metrics.mirrors.inc(target.cohort, "dropped")
            return "dropped"
        self.in_flight += 1
        self.metrics.mirrors.inc(target.cohort, "sent")
        task = asyncio.create_task(self._run(candidate, target, request_id, request, primary_model, primary_text,
                                             primary_checks))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "sent"

    async def _run(self, candidate, target, request_id, request, primary_model, primary_text, primary_checks):
        try:
            backend = self.backends[candidate]
            call = self.telemetry.call(request, backend, cohort=target.cohort, route=target.cohort, mirror=True)
            output = checks = error = None
            started = time.perf_counter()
            try:
                completion = await asyncio.wait_for(backend.generate(request), self.timeout)
            except (BackendError, asyncio.TimeoutError) as exc:
                error = str(exc) or f"timed out after {self.timeout} s"
                call.fail(getattr(exc, "error_type", "timeout"), error)
            except asyncio.CancelledError:
                call.fail("cancelled", "the gateway stopped before the mirrored call ended")
                raise
            else:
                output, checks = completion.text, run_checks(target.route, completion.text)
                call.succeed(completion, checks)
            self.metrics.mirror_duration.observe(time.perf_counter() - started, target.cohort, candidate)
            await asyncio.to_thread(self.registry.record_mirror, request_id, target.cohort, primary_model,
                                    primary_text, primary_checks, candidate, output, checks, error)
            self.metrics.mirrors.inc(target.cohort, "error" if error else "recorded")
            if self.on_pair is not None and output is not None:  # both answers in: the live tests score the pair
                self.on_pair(target, request_id, request, primary_model, primary_text, candidate, output)
        finally:
            self.in_flight -= 1

    async def drain(self, timeout: float = 5.0) -> None:
        """Let in-flight mirrored calls finish (bounded), then cancel the rest."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
