"""Run the gateway with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from .config import GatewayConfig


def serve(plan_path: str | Path, host: str = "127.0.0.1", port: int = 8080, *,
          registry: str | Path = "mergegate-registry.sqlite", suite: str | Path | None = None,
          admin_token: str | None = None, traces_path: str | Path | None = None, otlp_endpoint: str | None = None,
          config: GatewayConfig | None = None, log_level: str = "info", torch_threads: int | None = None) -> None:
    """Load the plan, build the gateway and serve it until interrupted.

    `admin_token` falls back to $MERGEGATE_ADMIN_TOKEN; the OTLP endpoint to the standard OTEL_* variables.
    `torch_threads` sets this process's torch intra-op threads (1 is fastest for small models on busy hosts); it is
    ignored when the plan has no local model, so that torch is never imported."""
    import uvicorn

    from ..registry import Registry
    from ..rollout import load_plan
    from .app import create_app

    plan = load_plan(plan_path)
    if torch_threads and any(spec.path is not None for spec in plan.models.values()):
        import torch  # only for local models: a remote-only gateway never loads torch

        torch.set_num_threads(torch_threads)
    app = create_app(plan, registry=Registry(registry), suite=suite,
                     admin_token=admin_token or os.environ.get("MERGEGATE_ADMIN_TOKEN") or None,
                     traces_path=traces_path, otlp_endpoint=otlp_endpoint, config=config, plan_path=plan_path)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
