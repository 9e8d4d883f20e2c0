"""`mergegate serve`: run the gateway over a rollout plan. Wired into the CLI with `register(app)`; the gateway
(FastAPI, uvicorn, OpenTelemetry, torch) is imported only when the command runs. FastAPI, uvicorn, httpx and
OpenTelemetry come with the `serve` extra; without it the command exits 2 with one line naming the extra."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer

from .._extras import install_hint, missing_extra


def _refuse_without_serve_extra(exc: ModuleNotFoundError) -> NoReturn:
    if missing_extra(exc) != "serve":
        raise exc
    typer.echo(f"mergegate: `mergegate serve` needs the serve extra ({exc.name} is not installed): "
               f"{install_hint('serve')}", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command("serve-folder")
    def serve_folder_command(
        path: Path = typer.Argument(..., help="Model folder to serve."),
        port: int = typer.Option(..., help="Port to listen on."),
        served_model_name: str = typer.Option(..., help="The name /v1/models lists and requests use."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when a GPU is "
                                                      "available, else cpu)."),
        log_level: str = typer.Option("warning", help="uvicorn log level."),
    ) -> None:
        """Serve one model folder the way `vllm serve PATH --served-model-name NAME` does (OpenAI-compatible
        /v1/models, /v1/completions, /v1/chat/completions), through the gateway with a one-model plan. Says where it
        will answer at once, and again when the model has loaded and it answers."""
        import tempfile

        from ..addresses import bind_port
        from ..errors import MergegateError

        try:
            import uvicorn  # noqa: F401  (imported when serving starts: a missing one is said before anything loads)

            from ..gateway import GatewayConfig, create_app
            from ..gateway.server import base_url, run_app
        except ModuleNotFoundError as exc:
            _refuse_without_serve_extra(exc)
        from ..registry import Registry
        from ..rollout import PlanModel, RolloutPlan

        if not (path / "config.json").is_file():
            typer.echo(f"mergegate: {path}: not a model folder (no config.json)", err=True)
            raise typer.Exit(2)
        try:
            if device is not None:
                from ..devices import check_device

                check_device(device, MergegateError)
            plan = RolloutPlan.single_model(served_model_name, PlanModel(role="candidate", path=str(path.absolute())))
            listener = bind_port(host, port)  # before the model loads: a busy port is refused at once
        except MergegateError as exc:
            typer.echo(f"mergegate: {exc}", err=True)
            raise typer.Exit(2) from None
        url = f"{base_url(listener)}/v1"
        typer.echo(f"mergegate: serve-folder: loading {path} as '{served_model_name}'; it answers at {url} once "
                   "loaded", err=True)
        try:
            with tempfile.TemporaryDirectory(prefix="mergegate-serve-folder-") as scratch:
                app_ = create_app(plan, registry=Registry(Path(scratch) / "registry.sqlite"),
                                  config=GatewayConfig(device=device))
                run_app(app_, listener, log_level=log_level, graceful_s=5, on_ready=lambda _: typer.echo(
                    f"mergegate: serve-folder: ready: '{served_model_name}' at {url}", err=True))
        except ModuleNotFoundError as exc:  # uvicorn is imported only when serving starts
            _refuse_without_serve_extra(exc)
        finally:
            listener.close()

    @app.command("serve")
    def serve_command(
        plan: Path = typer.Argument(..., help="Rollout plan YAML (written by `mergegate gate`)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8080, help="Port to listen on."),
        registry: Path = typer.Option(Path("mergegate-registry.sqlite"),
                                      help="SQLite registry: mirrored results and plan changes are recorded here."),
        suite: Optional[Path] = typer.Option(None, help="Eval suite JSONL: turns on the cohort classifier for "
                                                        "requests that name no cohort."),
        admin_token: Optional[str] = typer.Option(None, envvar="MERGEGATE_ADMIN_TOKEN",
                                                  help="Bearer token for /admin (admin API disabled without one)."),
        traces: Optional[Path] = typer.Option(None, help="Write spans to this JSONL file (OTLP is used when "
                                                         "OTEL_EXPORTER_OTLP_ENDPOINT or --otlp-endpoint is set)."),
        otlp_endpoint: Optional[str] = typer.Option(None, help="OTLP/HTTP collector base URL, e.g. "
                                                               "http://127.0.0.1:4318."),
        timeout: float = typer.Option(60.0, help="Seconds a backend may take, once it has started on a call, to "
                                                 "answer (streaming: to its first token, then between tokens) "
                                                 "before falling over. Time queued for a busy local model does not "
                                                 "count."),
        stream_max_duration: Optional[float] = typer.Option(None, help="Cap on a whole streamed answer, in "
                                                                       "seconds (default: none)."),
        queue_limit: int = typer.Option(64, help="Requests waiting for one local model; more are shed (the next "
                                                 "model answers, else 429 with Retry-After)."),
        max_prompt_tokens: int = typer.Option(4096, help="Longest prompt accepted, in tokens."),
        max_prompt_chars: int = typer.Option(65536, help="Longest prompt accepted, in characters (checked before "
                                                         "it is tokenized; /tokenize too)."),
        max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted, in bytes (413 above)."),
        max_admin_body_bytes: int = typer.Option(64 << 10, help="Largest /admin request body accepted, in bytes."),
        mirror_concurrency: int = typer.Option(4, help="Mirrored calls in flight; more are dropped."),
        breaker_failures: int = typer.Option(3, help="Consecutive failures that open a backend's breaker."),
        breaker_cooldown: float = typer.Option(30.0, help="Seconds a breaker stays open before a probe."),
        classifier_threshold: float = typer.Option(0.35, help="Cosine below which the classifier picks the default "
                                                              "route."),
        persist_plan: bool = typer.Option(False, help="Write admin route changes back to PLAN."),
        policy: Optional[Path] = typer.Option(None, help="The gate's policy YAML: turns on the live loop, which "
                                                         "decides each held cohort from live traffic "
                                                         "(docs/live.md)."),
        torch_threads: Optional[int] = typer.Option(None, help="torch intra-op threads for local models."),
        device: Optional[str] = typer.Option(None, help="Where local models run: cpu, cuda or cuda:N (default: cuda "
                                                      "when a GPU is available, else cpu; bf16 on CUDA)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Serve PLAN as an OpenAI-compatible gateway: per-cohort routing, fallback, mirroring, tracing."""
        from ..addresses import check_port
        from ..errors import MergegateError

        try:
            import uvicorn  # noqa: F401  (imported when serving starts: a missing one is said before anything loads)

            from ..gateway import GatewayConfig, serve
        except ModuleNotFoundError as exc:
            _refuse_without_serve_extra(exc)

        config = GatewayConfig(backend_timeout=timeout, stream_max_duration=stream_max_duration,
                               local_queue_limit=queue_limit, max_prompt_tokens=max_prompt_tokens,
                               max_prompt_chars=max_prompt_chars,
                               max_body_bytes=max_body_bytes, max_admin_body_bytes=max_admin_body_bytes,
                               mirror_concurrency=mirror_concurrency,
                               mirror_timeout=timeout, breaker_failures=breaker_failures,
                               breaker_cooldown=breaker_cooldown, classifier_threshold=classifier_threshold,
                               persist_plan=persist_plan, device=device)
        try:
            check_port(port)
            if device is not None:  # refused before the plan is loaded or a port is taken
                from ..devices import check_device

                check_device(device, MergegateError)
            token = (admin_token or "").strip()  # "" says no token: the environment is not read again
            live_policy = None
            if policy is not None:
                from ..gate import load_policy

                live_policy = load_policy(policy)  # refused (one line, exit 2) before any model loads

            def bound(url: str) -> None:
                typer.echo(f"mergegate: serve: loading {plan}'s models; it answers at {url}/v1 once loaded",
                           err=True)
                if not token:
                    why = "--admin-token is empty" if admin_token is not None else \
                        "no --admin-token (nor MERGEGATE_ADMIN_TOKEN)"
                    typer.echo(f"mergegate: {why}: the admin API (/admin) is off", err=True)

            serve(plan, host=host, port=port, registry=registry, suite=suite, admin_token=token,
                  traces_path=traces, otlp_endpoint=otlp_endpoint, config=config, log_level=log_level,
                  torch_threads=torch_threads, on_bound=bound, policy=live_policy,
                  on_ready=lambda url: typer.echo(f"mergegate: serve: ready: {plan} at {url}/v1", err=True))
        except MergegateError as exc:
            typer.echo(f"mergegate: {exc}", err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:  # uvicorn is imported only when serving starts
            _refuse_without_serve_extra(exc)
