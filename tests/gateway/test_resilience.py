"""Fallback, timeouts, circuit breakers and mirroring, against a real stub upstream switched to fail, hang or send
invalid JSON. Each test starts its own gateway (breaker and mirror state are per gateway)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from mergegate.gateway import GatewayConfig
from mergegate.gateway.mirror import sampled

from .helpers import MESSAGES, route_of, sample_sum, wait_for

pytestmark = pytest.mark.one_torch_thread

# Short enough to keep the tests quick, long enough that a busy machine does not end a cooldown mid-assertion.
COOLDOWN = 1.0
FAST = GatewayConfig(backend_timeout=2.0, breaker_failures=2, breaker_cooldown=COOLDOWN, max_tokens_limit=32)


def plan(family, stub, **routes) -> dict:
    return {
        "candidate": "cand",
        "models": {
            "base": {"role": "base", "path": str(family["base"])},
            "remote": {"url": stub.url, "upstream_model": "primary"},
            "cand": {"role": "candidate", "url": stub.url, "upstream_model": "candidate"},
        },
        "routes": {
            "ops": {"model": "remote", "fallback": ["base"]},
            "solo": {"model": "remote"},
            "mirrored": {"model": "remote", "mirror": 1.0, "check": "json_valid"},
            **routes,
        },
        "default": {"model": "base"},
    }


@pytest.fixture
def gw(family, stub, launch_each):
    return launch_each(plan(family, stub), config=FAST)


def ask(gw, cohort: str, **kw):
    return gw.client().chat.completions.with_raw_response.create(
        model="mergegate", messages=MESSAGES, max_tokens=4, extra_headers={"X-Cohort": cohort}, **kw)


def metric(gw, name: str, **labels: str) -> float:
    return sample_sum(gw.metrics(), name, **labels)


# -- fallback ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode, reason, error_type", [("fail", "http_error", "500"),
                                                      ("invalid_json", "bad_response", "bad_response"),
                                                      ("hang", "timeout", "timeout")])
def test_upstream_failure_falls_back_to_the_next_model(gw, stub, mode, reason, error_type):
    stub.set("primary", mode=mode)  # a hang lasts 30 s
    started = time.monotonic()
    response = ask(gw, "ops")
    assert time.monotonic() - started < 20  # a hang costs the timeout (2 s), not the hang (30 s)
    answer = response.parse()
    assert answer.model == "base"
    assert stub.calls["primary"] == 1
    route = route_of(response.headers)
    assert (route["fallback"], route["attempt"], route["skipped"]) == ("true", "1", f"remote:{reason}")
    assert metric(gw, "mergegate_fallbacks_total", cohort="ops", model="remote", reason=reason) == 1
    failed = [s for s in gw.spans() if s["name"] == "chat remote"][-1]
    assert failed["attributes"]["error.type"] == error_type and failed["status"] == "ERROR"
    assert "gen_ai.usage.output_tokens" not in failed["attributes"]


@pytest.mark.slow
def test_streaming_falls_back_while_nothing_has_been_sent(gw, stub):
    stub.set("primary", mode="fail")
    client = gw.client()
    direct = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=6)
    chunks = client.chat.completions.create(model="cohort/ops", messages=MESSAGES, max_tokens=6, stream=True)
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    assert {c.model for c in chunks} == {"base"}


@pytest.mark.slow
def test_remote_streaming_passes_chunks_through(gw, stub):
    stub.set("primary", reply="streamed from upstream")
    chunks = list(gw.client().chat.completions.create(model="cohort/ops", messages=MESSAGES, max_tokens=20,
                                                      stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == "streamed from upstream" and len(deltas) > 1
    assert chunks[-1].usage.completion_tokens == len(deltas)


@pytest.mark.slow
def test_every_model_failing_is_502_and_503_once_breakers_are_open(gw, stub):
    stub.set("primary", mode="fail")
    for _ in range(2):  # two failures open the breaker (breaker_failures=2)
        with pytest.raises(openai.InternalServerError) as caught:
            ask(gw, "solo")
        assert caught.value.status_code == 502 and "remote: http_error" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        ask(gw, "solo")
    assert caught.value.status_code == 503 and caught.value.code == "no_backend_available"
    assert "circuit_open" in caught.value.message
    assert stub.calls["primary"] == 2


# -- circuit breaker ---------------------------------------------------------------------------------------------

@pytest.mark.slow
class ManualClock:
    """A breaker's clock that moves only when a test says: the cooldown ends when the test ends it, however busy
    the machine is."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_opens_skips_during_cooldown_then_recovers(gw, stub):
    clock = gw.gateway.breakers["remote"].clock = ManualClock()
    stub.set("primary", mode="fail")
    for n in (1, 2):
        assert ask(gw, "ops").parse().model == "base"
        assert stub.calls["primary"] == n
    health = httpx.get(gw.url + "/healthz", timeout=10).json()
    assert health["backends"]["remote"]["state"] == "open" and health["status"] == "degraded"
    assert metric(gw, "mergegate_breaker_state", backend="remote") == 2
    skipped = ask(gw, "ops")  # open: skipped without a call
    assert route_of(skipped.headers)["skipped"] == "remote:circuit_open"
    assert stub.calls["primary"] == 2
    assert metric(gw, "mergegate_fallbacks_total", cohort="ops", model="remote", reason="circuit_open") == 1
    assert metric(gw, "mergegate_breaker_opened_total", backend="remote") == 1

    clock.now += COOLDOWN  # cooldown over: one probe goes through; it fails, so the breaker opens again
    assert route_of(ask(gw, "ops").headers)["skipped"] == "remote:http_error"
    assert stub.calls["primary"] == 3
    assert route_of(ask(gw, "ops").headers)["skipped"] == "remote:circuit_open"
    assert stub.calls["primary"] == 3

    stub.set("primary", mode="ok", reply="back")
    clock.now += COOLDOWN
    recovered = ask(gw, "ops")  # the probe succeeds and closes the breaker
    assert recovered.parse().model == "remote" and recovered.parse().choices[0].message.content == "back"
    assert httpx.get(gw.url + "/healthz", timeout=10).json()["backends"]["remote"]["state"] == "closed"
    assert ask(gw, "ops").parse().model == "remote"
    assert metric(gw, "mergegate_breaker_state", backend="remote") == 0


# -- mirroring ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mirrored_requests_record_both_outputs_and_checks(gw, stub):
    stub.set("primary", reply='{"answer": 42}')
    stub.set("candidate", reply="forty-two")
    response = ask(gw, "mirrored")
    answer = response.parse()
    assert (answer.model, answer.choices[0].message.content) == ("remote", '{"answer": 42}')
    rows = wait_for(lambda: gw.registry.mirror_results())
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == answer.id and row["cohort"] == "mirrored"
    assert (row["primary_model"], row["primary_output"]) == ("remote", '{"answer": 42}')
    assert (row["mirror_model"], row["mirror_output"], row["mirror_error"]) == ("cand", "forty-two", None)
    assert json.loads(row["primary_checks"])["json_valid"]["passed"] is True
    assert json.loads(row["mirror_checks"])["json_valid"]["passed"] is False
    assert stub.calls["candidate"] == 1
    assert ask(gw, "ops").parse().model == "remote"  # mirror 0 on this route: nothing more mirrored
    # a mirrored call is started before the caller is answered: none was for this one
    assert metric(gw, "mergegate_mirror_total", cohort="ops", outcome="sent") == 0
    assert metric(gw, "mergegate_mirror_total", cohort="mirrored", outcome="sent") == 1
    mirror_span = [s for s in gw.spans() if s["attributes"].get("mergegate.mirror")][-1]
    assert mirror_span["name"] == "chat cand"


@pytest.mark.slow
def test_mirror_failures_are_recorded_not_seen_by_the_caller(gw, stub):
    stub.set("primary", reply='{"ok": true}')
    stub.set("candidate", mode="fail")
    assert ask(gw, "mirrored").parse().model == "remote"
    row = wait_for(lambda: gw.registry.mirror_results())[0]
    assert row["mirror_output"] is None and "HTTP 500" in row["mirror_error"]
    assert metric(gw, "mergegate_mirror_total", cohort="mirrored", outcome="error") == 1


@pytest.mark.slow
def test_mirroring_is_bounded_and_drops_when_saturated(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(mirror_concurrency=1, backend_timeout=30))
    stub.set("primary", reply='{"n": 1}')
    stub.set("candidate", delay=10.0, reply='{"n": 2}')
    for _ in range(4):
        assert ask(gw, "mirrored").parse().model == "remote"
    assert metric(gw, "mergegate_mirror_total", cohort="mirrored", outcome="sent") == 1
    assert metric(gw, "mergegate_mirror_total", cohort="mirrored", outcome="dropped") == 3
    assert metric(gw, "mergegate_mirror_in_flight") == 1  # every caller was answered while the mirror still ran
    rows = wait_for(lambda: gw.registry.mirror_results(), timeout=60)
    assert len(rows) == 1 and rows[0]["mirror_output"] == '{"n": 2}'
    wait_for(lambda: metric(gw, "mergegate_mirror_in_flight") == 0)
    assert stub.calls["candidate"] == 1


def test_mirror_sampling_is_deterministic_and_follows_the_share():
    ids = [f"chatcmpl-{i:06d}" for i in range(4000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert picked == [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(picked) / len(ids) < 0.28
    assert not any(sampled(i, 0.0) for i in ids[:100]) and all(sampled(i, 1.0) for i in ids[:100])
