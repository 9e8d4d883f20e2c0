"""Run the gateway with uvicorn, on a port taken before any model loads."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import GatewayConfig

if TYPE_CHECKING:  # the gateway never imports the gate at run time: the caller loads the policy
    from ..gate import Policy


def serve(  # noqa: PLR0913  (the Python twin of `mergegate serve`: a keyword per flag, all but three keyword-only)
        plan_path: str | Path, host: str = "127.0.0.1", port: int = 8080, *,
          registry: str | Path = "mergegate-registry.sqlite", suite: str | Path | None = None,
          admin_token: str | None = None, traces_path: str | Path | None = None, otlp_endpoint: str | None = None,
          config: GatewayConfig | None = None, log_level: str = "info", torch_threads: int | None = None,
          on_bound: Callable[[str], None] | None = None, on_ready: Callable[[str], None] | None = None,
          policy: Policy | None = None) -> None:
    """Load the plan, build the gateway and serve it until interrupted.

    The plan and the OTLP endpoint are checked and the port taken (`addresses.bind_port`) before any model
    loads: each refusal is a MergegateError in a moment, not after the models' load. `on_bound(url)` is called
    once the port is taken, `on_ready(url)` once the models are loaded and requests are answered. `admin_token` None falls back to
    $MERGEGATE_ADMIN_TOKEN; an empty or blank one is none (the admin API is off). The OTLP endpoint falls back to
    the standard OTEL_* variables.
    `torch_threads` sets this process's torch intra-op threads (1 is fastest for small models on busy hosts); it is
    ignored when the plan has no local model, so that torch is never imported. `policy` (the gate's, a loaded
    `mergegate.gate.Policy`) turns on the live loop (live.py)."""
    from ..addresses import bind_port
    from ..registry import Registry
    from ..rollout import load_plan
    from .app import create_app

    plan = load_plan(plan_path)
    if otlp_endpoint:
        check_otlp_endpoint(otlp_endpoint)
    listener = bind_port(host, port)
    try:
        if on_bound is not None:
            on_bound(base_url(listener))
        if torch_threads and any(plan.model_ref(name).path is not None for name in plan.models):
            import torch  # only for local models: a remote-only gateway never loads torch

            torch.set_num_threads(torch_threads)
        given = admin_token if admin_token is not None else os.environ.get("MERGEGATE_ADMIN_TOKEN")
        token = (given or "").strip() or None
        app = create_app(plan, registry=Registry(registry), suite=suite, admin_token=token,
                         traces_path=traces_path, otlp_endpoint=otlp_endpoint, config=config, plan_path=plan_path,
                         policy=policy)
        run_app(app, listener, log_level=log_level, graceful_s=10, on_ready=on_ready)
    finally:
        listener.close()


def check_otlp_endpoint(url: str) -> str:
    """The OTLP collector's base URL, checked as every url is (`addresses.check_url`), named by its option."""
    from ..addresses import check_url
    from ..errors import AddressError

    try:
        return check_url(url)
    except AddressError as exc:
        raise AddressError(f"--otlp-endpoint: {exc}") from None


def base_url(listener: socket.socket) -> str:
    """Where a listening socket answers, as http://HOST:PORT."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_app(app, listener: socket.socket, *, log_level: str, graceful_s: float,
            on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `app` with uvicorn on `listener` (a bound socket: `addresses.bind_port`) until interrupted;
    `on_ready(url)` once the app's start-up (the models' load) is done and it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(base_url(listener))

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(graceful_s))
    Server(config).run(sockets=[listener])
