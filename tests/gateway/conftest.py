"""Gateway fixtures: real uvicorn servers on 127.0.0.1 over tiny in-process models, and a scriptable stub
upstream. Every gateway module is marked `one_torch_thread` (tests/conftest.py): tiny models generate fastest
single-threaded, especially on a busy 2-core machine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from mergegate.gateway import GatewayConfig, create_app
from mergegate.gateway.testing import ServerThread, StubUpstream
from mergegate.registry import Registry
from mergegate.rollout import RolloutPlan


@dataclass
class Running:
    server: ServerThread
    app: object
    registry: Registry
    traces: Path
    plan_path: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def gateway(self):
        return self.app.state.gateway

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=30, **kw)

    def spans(self) -> list[dict]:
        if not self.traces.exists():
            return []
        return [json.loads(line) for line in self.traces.read_text().splitlines() if line.strip()]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text


def _launch(plan: dict, folder: Path, **options) -> Running:
    folder.mkdir(parents=True, exist_ok=True)
    plan_obj = RolloutPlan.model_validate(plan)
    plan_path = folder / "rollout.yaml"
    plan_obj.save(plan_path)
    # a registry of an earlier gateway (a restart), and what to record in it before this one starts
    registry = Registry(options.pop("registry_path", folder / "registry.sqlite"))
    options.pop("before_start", lambda registry: None)(registry)
    traces = folder / "traces.jsonl"
    config = options.pop("config", GatewayConfig())
    app = create_app(plan_obj, registry=registry, traces_path=traces, config=config, plan_path=plan_path, **options)
    server = ServerThread(app).start()
    return Running(server, app, registry, traces, plan_path)


@pytest.fixture(scope="module")
def stub():
    """A scriptable OpenAI-compatible upstream on 127.0.0.1; `stub.url` is its /v1 base URL."""
    upstream = StubUpstream()
    with ServerThread(upstream.app) as server:
        upstream.url = server.url + "/v1"
        yield upstream


@pytest.fixture(autouse=True)
def fresh_stub(request):
    """Each test starts with the module's stub un-scripted."""
    if "stub" in request.fixturenames:
        request.getfixturevalue("stub").reset()
    yield


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Start gateways that live until the end of the module."""
    running: list[Running] = []

    def start(plan: dict, **options) -> Running:
        running.append(_launch(plan, tmp_path_factory.mktemp("gateway"), **options))
        return running[-1]

    yield start
    for r in running:
        r.server.stop()


@pytest.fixture
def launch_each(tmp_path):
    """Start gateways that live for one test (for tests that change breaker, mirror or plan state)."""
    running: list[Running] = []

    def start(plan: dict, **options) -> Running:
        running.append(_launch(plan, tmp_path / f"gw{len(running)}", **options))
        return running[-1]

    yield start
    for r in running:
        r.server.stop()
