"""The gateway's parts wired together, and the FastAPI app factory."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..rollout import RolloutPlan
from .admin import PlanStore
from .admin import router as admin_router
from .api import router as api_router
from .backends import Backend, build_backends
from .breaker import STATE_VALUES, CircuitBreaker
from .classifier import CohortClassifier, Embed
from .config import GatewayConfig
from .dispatch import Dispatcher
from .ensembles import run_strategy
from .errors import APIError
from .hops import new_hop_id
from .live import LiveController
from .live import router as live_router
from .metrics import Metrics
from .mirror import Mirror
from .routing import Router
from .telemetry import Telemetry

if TYPE_CHECKING:  # annotations only: importing the evaluation stack would load torch
    from ..evaluate.suite import Suite
    from ..gate import Policy
    from ..registry import Registry

log = logging.getLogger("mergegate.gateway")


class Gateway:
    """Everything one running gateway holds: the live plan, backends and their breakers, router, dispatcher,
    mirror, metrics and telemetry."""

    def __init__(  # noqa: PLR0913  (the gateway's parts, each optional and keyword-only, as create_app's)
            self, plan: RolloutPlan, *, registry, config: GatewayConfig | None = None, suite=None,
                 admin_token: str | None = None, traces_path: str | Path | None = None,
                 otlp_endpoint: str | None = None, plan_path: str | Path | None = None,
                 backends: dict[str, Backend] | None = None, embed: Embed | None = None, policy: Policy | None = None):
        self.config = config or GatewayConfig()
        self.registry, self.admin_token = registry, admin_token
        self.started_at = int(time.time())
        self.hop_id = new_hop_id()  # marks the requests this gateway sends upstream (hops.py)
        self.store = PlanStore(plan, registry=registry, path=plan_path, persist=self.config.persist_plan)
        self.metrics = Metrics()  # this gateway's own registry
        self.telemetry = Telemetry(self.metrics, traces_path=traces_path, otlp_endpoint=otlp_endpoint)
        self.backends = backends or build_backends(plan, self.config)
        missing = set(plan.models) - set(self.backends)
        if missing:
            raise ValueError(f"no backend for plan model(s): {', '.join(sorted(missing))}")
        self.breakers = {name: CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown)
                         for name in self.backends}
        if isinstance(suite, (str, Path)):
            from ..evaluate.suite import load_suite

            suite = load_suite(suite)
        self.router = Router(self._classifier(suite, plan, embed))
        self.dispatcher = Dispatcher(self.backends, self.breakers, self.telemetry, self.metrics, self.config,
                                     run_strategy=run_strategy)
        self.mirror = Mirror(registry=registry, backends=self.backends, telemetry=self.telemetry, metrics=self.metrics,
                             limit=self.config.mirror_concurrency, timeout=self.config.mirror_timeout)
        # the live loop (live.py): decides held cohorts from live traffic, with the policy the plan was gated with
        self.live = LiveController(self.store, registry, policy, self.metrics, suite=suite) if policy else None
        if self.live is not None:
            self.mirror.on_pair = self.live.on_pair
        self.metrics.gauge("mergegate_breaker_state", "Circuit breaker state per backend: 0 closed, 1 half-open "
                           "(a probe may go through), 2 open.", ("backend",),
                           collect=lambda: {(n, ): STATE_VALUES[b.snapshot()["state"]]
                                            for n, b in self.breakers.items()})
        self.metrics.gauge("mergegate_mirror_in_flight", "Mirrored calls to the candidate in flight.", (),
                           collect=lambda: {(): self.mirror.in_flight})
        self.metrics.gauge("mergegate_mirror_capacity", "Mirrored calls allowed in flight.", (),
                           collect=lambda: {(): self.mirror.limit})

    def _classifier(self, suite, plan: RolloutPlan, embed: Embed | None) -> CohortClassifier | None:
        if suite is None:
            return None
        return CohortClassifier.from_suite(suite, self.config.classifier_threshold, embed, cohorts=list(plan.routes))

    @property
    def plan(self) -> RolloutPlan:
        return self.store.plan

    async def start(self) -> None:
        for backend in self.backends.values():  # one at a time: bounded memory, and no concurrent lazy imports
            await backend.start()
        if self.live is not None:
            await self.live.start()

    async def stop(self) -> None:
        await self.mirror.drain(timeout=5.0)
        if self.live is not None:
            await self.live.stop()
        await asyncio.gather(*(backend.close() for backend in self.backends.values()), return_exceptions=True)
        self.telemetry.shutdown()

    def health(self) -> tuple[int, dict]:
        backends, healthy = {}, 0
        for name, backend in self.backends.items():
            entry = {**backend.describe(), **self.breakers[name].snapshot()}
            entry["healthy"] = entry.get("loaded", True) and entry["state"] != "open"
            healthy += entry["healthy"]
            backends[name] = entry
        status = "ok" if healthy == len(backends) else "degraded" if healthy else "unavailable"
        return (503 if status == "unavailable" else 200), {"status": status, "backends": backends}


def create_app(  # noqa: PLR0913  (the gateway's parts, each optional and keyword-only)
        plan: RolloutPlan, *, registry: Registry, suite: Suite | str | Path | None = None, admin_token: str | None = None,
               traces_path: str | Path | None = None, otlp_endpoint: str | None = None,
               config: GatewayConfig | None = None, plan_path: str | Path | None = None,
               backends: dict[str, Backend] | None = None, embed: Embed | None = None,
               policy: Policy | None = None) -> FastAPI:
    """The gateway as an ASGI app. Models load when the app starts (its lifespan), not here.

    `suite` (a Suite or a JSONL path) turns on the cohort classifier; `embed` replaces MiniLM for it.
    `backends` replaces the backends built from the plan (name → Backend). `policy` (the gate's) turns on the live
    loop (live.py): held cohorts decided from live traffic."""
    gateway = Gateway(plan, registry=registry, config=config, suite=suite, admin_token=admin_token,
                      traces_path=traces_path, otlp_endpoint=otlp_endpoint, plan_path=plan_path, backends=backends,
                      embed=embed, policy=policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="mergegate gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.include_router(api_router)
    app.include_router(admin_router)
    app.include_router(live_router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        err = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_middleware(ContainErrors)
    return app


class ContainErrors:
    """An unexpected exception becomes a 500 in OpenAI's error format, and goes no further.

    Starlette's outermost middleware answers 500 and then re-raises, and uvicorn drops a connection whose
    request raised: the caller's next requests on that keep-alive connection would be reset. Here the error
    is logged and answered, and the connection stays usable (unless the answer had already begun)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            log.exception("error while answering %s %s", scope.get("method"), scope.get("path"))
            err = APIError(500, f"Internal gateway error: {type(exc).__name__}: {exc}", type="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)
