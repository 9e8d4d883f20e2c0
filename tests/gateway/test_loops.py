"""A plan whose url model leads back to the gateway (itself, or through another gateway) is a loop: the gateway
marks each upstream request with a hop header naming itself, and a request that already passed through it is
answered 508 at once, so one call costs one extra hop per gateway, never a cascade of requests to itself."""

from __future__ import annotations

import socket
from contextlib import ExitStack

import httpx
import pytest

from mergegate.gateway import GatewayConfig, create_app
from mergegate.gateway.testing import LOOPBACK, ServerThread
from mergegate.registry import Registry
from mergegate.rollout import RolloutPlan

from .helpers import MESSAGES

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]
CONFIG = GatewayConfig(backend_timeout=5.0)  # bounds how long the loop runs where it is not caught


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((LOOPBACK, 0))
        return [probe.getsockname()[1] for probe in probes]


def gateway_to(port: int, upstream_port: int, tmp_path) -> ServerThread:
    """A gateway on `port` whose one model, `me`, is served by the gateway on `upstream_port` as `me`."""
    plan = RolloutPlan.model_validate({
        "candidate": "me", "models": {"me": {"url": f"http://{LOOPBACK}:{upstream_port}/v1", "upstream_model": "me"}},
        "routes": {}, "default": {"model": "me"}})
    app = create_app(plan, registry=Registry(tmp_path / f"registry-{port}.sqlite"), config=CONFIG)
    return ServerThread(app, port=port)


def requests_handled(server: ServerThread) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("mergegate_requests_total{"))


@pytest.mark.parametrize("gateways", [1, 2], ids=["itself", "through-another-gateway"])
def test_a_url_model_that_leads_back_to_the_gateway_is_a_508_at_once(tmp_path, gateways):
    ports = free_ports(gateways)
    with ExitStack() as stack:  # gateway i's model is served by gateway i+1, the last by the first
        servers = [stack.enter_context(gateway_to(port, ports[(i + 1) % gateways], tmp_path))
                   for i, port in enumerate(ports)]
        for stream in (False, True):
            answer = httpx.post(servers[0].url + "/v1/chat/completions", timeout=60, json={
                "model": "me", "messages": MESSAGES, "max_tokens": 4, "stream": stream})
            assert answer.status_code == 508, answer.text[:500]
            error = answer.json()["error"]
            assert error["code"] == "loop_detected" and "leads back" in error["message"], error
        # each request went once round the loop and back to the first gateway, which refused it
        assert sum(requests_handled(s) for s in servers) == 2 * (gateways + 1)

        refused = httpx.post(servers[0].url + "/tokenize", timeout=60, json={"model": "me", "prompt": "hi"})
        assert refused.status_code == 508 and refused.json()["error"]["code"] == "loop_detected", refused.text[:500]


def test_a_hop_header_from_elsewhere_is_passed_on_and_a_long_one_refused(tmp_path):
    [port] = free_ports(1)
    with gateway_to(port, port, tmp_path) as server:
        too_many = ",".join(f"gw{i}" for i in range(64))
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers={"x-mergegate-hops": too_many},
                            json={"model": "me", "messages": MESSAGES, "max_tokens": 4})
        assert answer.status_code == 508 and "64 gateways" in answer.json()["error"]["message"]
