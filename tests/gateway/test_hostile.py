"""The gateway against hostile or unlucky traffic: out-of-range parameters, malformed and oversized bodies, bursts
that queue behind a busy local model, long streams, callers that hang up. A real uvicorn server on 127.0.0.1
over tiny in-process models and the stub upstream, driven by httpx, raw sockets and the openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergegate.gateway import GatewayConfig, errors
from mergegate.gateway.backends import LocalBackend, RemoteBackend
from mergegate.gateway.errors import APIError
from mergegate.gateway.protocol import GenParams, GenRequest, parse_body, to_gen_request
from mergegate.serving.launcher import free_port

from .helpers import MESSAGES, wait_for

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.filterwarnings("ignore::FutureWarning")]
TOKEN = "admin-token"


def plan(family, stub, **routes) -> dict:
    return {
        "candidate": "cand",
        "models": {
            "base": {"role": "base", "path": str(family["base"])},
            "ft1": {"path": str(family["ft1"])},
            "remote": {"url": stub.url, "upstream_model": "primary"},
            "cand": {"role": "candidate", "url": stub.url, "upstream_model": "candidate"},
        },
        "routes": {
            "chat": {"model": "ft1", "fallback": ["base"]},
            "solo": {"model": "remote"},
            "checked": {"model": "base", "check": "json_valid"},
            **routes,
        },
        "default": {"model": "base"},
    }


@pytest.fixture(scope="module")
def gw(family, stub, launch):
    """One gateway for the tests that leave no state behind (each 4xx is answered before any backend)."""
    return launch(plan(family, stub), admin_token=TOKEN,
                  config=GatewayConfig(max_tokens_limit=64, breaker_failures=2, breaker_cooldown=60.0))


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def breaker(gw, model: str) -> dict:
    return httpx.get(gw.url + "/healthz", timeout=10).json()["backends"][model]


# -- 13: client input is validated up front, and a request's own fault never counts against a backend ------------

@pytest.mark.slow
def test_out_of_range_seed_is_a_400_and_never_opens_a_breaker(gw):
    body = {"model": "mergegate", "messages": MESSAGES, "max_tokens": 4, "temperature": 1.0, "seed": 2 ** 64}
    for _ in range(4):  # breaker_failures=2: this used to open ft1's and base's breakers
        response = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"X-Cohort": "chat"}, timeout=30)
        error = error_of(response, 400)
        assert error["param"] == "seed" and error["type"] == "invalid_request_error"
    for model in ("ft1", "base"):
        assert breaker(gw, model)["state"] == "closed" and breaker(gw, model)["consecutive_failures"] == 0
    answer = gw.client().chat.completions.create(model="cohort/chat", messages=MESSAGES, max_tokens=4,
                                                 temperature=1.0, seed=2 ** 63 - 1)
    assert answer.model == "ft1"


INVALID = [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", "0.7"), ("temperature", True),
    ("top_p", 0), ("top_p", 1.5), ("top_p", "1"),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.5), ("max_tokens", "8"), ("max_tokens", True),
    ("max_tokens", 10 ** 30), ("max_completion_tokens", 0),
    ("n", 2), ("n", 0), ("n", "1"),
    ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("seed", 1.5), ("seed", "7"),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", [1]), ("stop", "x" * 300), ("stop", 5),
    ("stream", "yes"), ("stream_options", {"include_usage": "yes"}),
    ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("metadata", {"cohort": 5}), ("metadata", {f"k{i}": "v" for i in range(17)}), ("metadata", {"k": "v" * 600}),
    ("model", 5), ("model", ""), ("messages", [{"role": "user", "content": 5}]),
]


@pytest.mark.slow
@pytest.mark.parametrize("param, value", INVALID, ids=[f"{p}={str(v)[:12]}" for p, v in INVALID])
def test_out_of_range_or_mistyped_parameters_are_openai_style_400s(gw, param, value):
    body = {"model": "cohort/chat", "messages": MESSAGES, "max_tokens": 2, param: value}
    error = error_of(httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30), 400)
    assert error["param"].split(".")[0] == param and error["type"] == "invalid_request_error"


@pytest.mark.slow
def test_an_upstream_refusing_a_request_as_invalid_is_a_4xx_not_a_breaker_failure(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(breaker_failures=2, breaker_cooldown=60.0))
    stub.set("primary", mode="fail", status=400)
    for _ in range(3):
        with pytest.raises(openai.BadRequestError) as caught:
            gw.client().chat.completions.create(model="cohort/solo", messages=MESSAGES, max_tokens=4)
        assert "HTTP 400" in caught.value.message
    assert stub.calls["primary"] == 3  # never skipped: its breaker did not open
    assert breaker(gw, "remote")["state"] == "closed" and breaker(gw, "remote")["consecutive_failures"] == 0
    stub.set("primary", mode="ok", reply="fine")
    assert gw.client().chat.completions.create(model="cohort/solo", messages=MESSAGES,
                                               max_tokens=4).choices[0].message.content == "fine"


def test_a_local_model_refusing_a_parameter_raises_rejected_not_a_failure(family):
    """Defence in depth behind the up-front checks: what a local model cannot take before it starts generating
    is the request's fault (BackendRejected, not counted by the breaker)."""
    async def run():
        backend = LocalBackend("base", family["base"])
        await backend.start()
        try:
            bad = GenRequest("chat", GenParams(max_tokens=2, temperature=1.0, seed=2 ** 64), messages=tuple(MESSAGES))
            with pytest.raises(errors.BackendRejected) as caught:
                await backend.generate(bad)
            assert not caught.value.counts_as_failure
            good = GenRequest("chat", GenParams(max_tokens=2), messages=tuple(MESSAGES))
            assert (await backend.generate(good)).completion_tokens >= 1
            assert backend._pending == 0
        finally:
            await backend.close()

    asyncio.run(run())


# -- 14: hostile bodies are 4xx, and the connection stays usable ---------------------------------------------------

def _chat_bytes(extra: bytes = b"", content: bytes = b'"hi"') -> bytes:
    return b'{"model": "cohort/chat", "max_tokens": 2, "messages": [{"role": "user", "content": ' + content + b"}]" \
        + extra + b"}"


HOSTILE = [
    ("5000-digit max_tokens", _chat_bytes(b', "max_tokens": ' + b"9" * 5000), 400),
    ("huge float", _chat_bytes(b', "temperature": 1e999'), 400),
    ("NaN", _chat_bytes(b', "temperature": NaN'), 400),
    ("lone surrogate", _chat_bytes(content=b'"\\ud800"'), 400),
    ("lone low surrogate in a key", _chat_bytes(b', "\\udc00": 1'), 400),
    ("100k-deep nesting", _chat_bytes(b', "x": ' + b"[" * 100_000 + b"]" * 100_000), 400),
    ("100-deep nesting", _chat_bytes(b', "x": ' + b"[" * 100 + b"]" * 100), 400),
    ("unclosed deep nesting", b"[" * 100_000, 400),
    ("invalid UTF-8", _chat_bytes(content=b'"\xff\xfe"'), 400),
    ("not an object", b'"just a string"', 400),
    ("empty", b"", 400),
    ("over the byte limit", _chat_bytes(content=b'"' + b"a" * (1 << 20) + b'"'), 413),
]


@pytest.mark.slow
def test_hostile_bodies_are_4xx_and_the_keep_alive_connection_stays_usable(gw):
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=gw.url, timeout=30, limits=limits) as client:
        peers = set()

        def post(path: str, **kw) -> httpx.Response:
            response = client.post(path, headers={"content-type": "application/json"}, **kw)
            peers.add(response.extensions["network_stream"].get_extra_info("client_addr"))
            return response

        for _name, body, status in HOSTILE:
            error_of(post("/v1/chat/completions", content=body), status)
        error_of(post("/v1/completions", content=b'{"model": "cohort/chat", "prompt": "\\udfff"}'), 400)
        chunked = iter([b'{"model": "cohort/chat", "x": "'] + [b"b" * 65536] * 20 + [b'"}'])  # no Content-Length
        error_of(post("/v1/chat/completions", content=chunked), 413)
        for _ in range(10):
            response = post("/v1/chat/completions", content=_chat_bytes())
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "ft1"
        assert len(peers) == 1  # one connection throughout: nothing closed it
    assert breaker(gw, "ft1")["state"] == "closed"


class Broken(LocalBackend):
    """A backend with a bug: it raises something that is not a BackendError."""

    async def generate(self, request, *, slot=None):
        raise RuntimeError("a bug, not a backend failure")


@pytest.mark.slow
def test_an_unexpected_error_is_a_json_500_and_keeps_the_connection(family, launch_each):
    spec = {"candidate": "base", "models": {"base": {"role": "base", "path": str(family["base"])},
                                            "broken": {"path": str(family["base"])}},
            "routes": {}, "default": {"model": "base"}}
    gw = launch_each(spec, backends={"base": LocalBackend("base", family["base"]),
                                     "broken": Broken("broken", family["base"])})
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=gw.url, timeout=30, limits=limits) as client:
        responses = [client.post("/v1/chat/completions", json={"model": "broken", "messages": MESSAGES})
                     for _ in range(3)]
        responses += [client.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES,
                                                                "max_tokens": 2}) for _ in range(10)]
        peers = {r.extensions["network_stream"].get_extra_info("client_addr") for r in responses}
    for r in responses[:3]:
        assert "a bug" in error_of(r, 500)["message"]
    assert [r.status_code for r in responses[3:]] == [200] * 10
    assert len(peers) == 1  # one connection throughout: nothing closed it


# -- 15: queueing for a busy local model is load, not failure ------------------------------------------------------

def _burst(url: str, body: dict, count: int, headers: dict | None = None) -> list[httpx.Response]:
    async def run():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=headers or {})
                                          for _ in range(count)))

    return asyncio.run(run())


@pytest.mark.slow
def test_a_burst_queued_behind_a_local_fallback_is_answered_without_timeouts(family, launch_each):
    down = f"http://127.0.0.1:{free_port()}/v1"
    gw = launch_each({
        "candidate": "base",
        "models": {"base": {"role": "base", "path": str(family["base"])},
                   "remote": {"url": down, "upstream_model": "primary"}},
        "routes": {"ops": {"model": "remote", "fallback": ["base"]}},
        "default": {"model": "base"},
    }, config=GatewayConfig(backend_timeout=5.0, breaker_failures=2, breaker_cooldown=60.0))
    body = {"model": "cohort/ops", "messages": MESSAGES, "max_tokens": 32}
    # ~48 x 32 tokens queue for `base` longer than the 5 s timeout, which one 32-token answer never takes, even on a
    # busy machine
    responses = _burst(gw.url, body, 48)
    assert [r.status_code for r in responses] == [200] * 48, [r.text for r in responses if r.status_code != 200][:3]
    assert {r.json()["model"] for r in responses} == {"base"}
    assert breaker(gw, "base")["state"] == "closed" and breaker(gw, "base")["consecutive_failures"] == 0
    assert 'reason="timeout"' not in gw.metrics()
    assert gw.gateway.backends["base"]._pending == 0


@pytest.mark.slow
def test_a_burst_queued_for_upstream_connections_is_answered_without_timeouts(stub, launch_each):
    """More concurrent calls than the upstream's connections: the rest wait for one, untimed. Two connections, so
    that three waves of 4 s each take no longer on a busy machine than on an idle one; a wait for a connection
    that counted toward the 7 s timeout would fail the later waves."""
    remote = RemoteBackend("remote", stub.url, upstream_model="primary", timeout=7.0, max_connections=2)
    gw = launch_each({"candidate": "remote", "models": {"remote": {"url": stub.url, "upstream_model": "primary"}},
                      "routes": {}, "default": {"model": "remote"}}, backends={"remote": remote},
                     config=GatewayConfig(backend_timeout=7.0, breaker_failures=2))
    stub.set("primary", delay=4.0, reply="slow but fine")
    responses = _burst(gw.url, {"model": "remote", "messages": MESSAGES, "max_tokens": 8}, 6)
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses if r.status_code != 200][:3]
    assert stub.calls["primary"] == 6
    assert breaker(gw, "remote")["state"] == "closed" and breaker(gw, "remote")["consecutive_failures"] == 0


@pytest.mark.slow
def test_a_full_local_queue_sheds_with_429_and_retry_after(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(local_queue_limit=1, backend_timeout=30.0))
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 64}  # pinned: no fallback
    responses = _burst(gw.url, body, 12)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and error_of(r, 429)["code"] == "overloaded"
    assert breaker(gw, "base")["state"] == "closed" and breaker(gw, "base")["consecutive_failures"] == 0


# -- 16: timeouts bound the first token and the gaps between tokens, not a healthy stream's length ----------------

STEADY = "abcd" * 14  # 14 chunks


def stream_text(gw, **kw) -> str:
    chunks = gw.client().chat.completions.create(model="cohort/solo", messages=MESSAGES, max_tokens=64, stream=True,
                                                 **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.slow
def test_a_slow_but_steady_stream_outlives_the_timeout(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(backend_timeout=2.0, breaker_failures=2))
    stub.set("primary", reply=STEADY, interval=0.25)  # ~3.5 s in all, a chunk every 0.25 s
    assert stream_text(gw) == STEADY
    assert breaker(gw, "remote")["consecutive_failures"] == 0
    assert "stream_timeout" not in gw.metrics()


@pytest.mark.slow
def test_a_stalled_stream_is_still_cut_after_the_timeout(family, stub, launch_each):
    # the first chunk must come within the timeout too: 10 s, which it takes even on a busy machine
    gw = launch_each(plan(family, stub), config=GatewayConfig(backend_timeout=10.0, breaker_failures=2))
    stub.set("primary", reply="abcdefgh", interval=60.0)  # one chunk, then 60 s of silence
    with pytest.raises(openai.APIError) as caught:
        stream_text(gw)
    assert "sent nothing more within 10.0 s" in caught.value.message
    assert breaker(gw, "remote")["consecutive_failures"] == 1


@pytest.mark.slow
def test_an_optional_total_cap_still_ends_a_long_stream(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(backend_timeout=2.0, stream_max_duration=1.0))
    stub.set("primary", reply=STEADY, interval=0.25)
    with pytest.raises(openai.APIError) as caught:
        stream_text(gw)
    assert "stream_max_duration" in caught.value.message
    assert breaker(gw, "remote")["consecutive_failures"] == 0  # a policy cut, not ill health


# -- 17: a caller hanging up cancels its generation; admin bodies are bounded -------------------------------------

class RecordingLocal(LocalBackend):
    """A real local backend that records, per generation, whether it was told to stop and how many tokens it made."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.started = threading.Event()
        self.ended: list[tuple[bool, int]] = []

    def _generate(self, request, emit, cancel):
        self.started.set()
        completion = super()._generate(request, emit, cancel)
        self.ended.append((cancel.is_set(), completion.completion_tokens))
        return completion


@pytest.mark.slow
@pytest.mark.parametrize("cohort, stream", [("checked", True), ("checked", False), ("default", False)])
def test_a_caller_hanging_up_stops_a_buffered_or_unstreamed_generation(family, launch_each, cohort, stream):
    base = RecordingLocal("base", family["base"])
    spec = {"candidate": "base", "models": {"base": {"role": "base", "path": str(family["base"])}},
            "routes": {"checked": {"model": "base", "check": "json_valid"}}, "default": {"model": "base"}}
    gw = launch_each(spec, backends={"base": base}, config=GatewayConfig(max_tokens_limit=1024))
    body = json.dumps({"model": f"cohort/{cohort}", "messages": MESSAGES, "max_tokens": 1024,
                       "stream": stream}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", gw.server.port), timeout=30) as sock:
        sock.sendall(request)
        assert base.started.wait(30)
    # the caller is gone while `base` generates up to 1024 tokens
    cancelled, tokens = wait_for(lambda: base.ended and base.ended[0], timeout=60)
    assert cancelled and tokens < 1024
    wait_for(lambda: base._pending == 0)
    wait_for(lambda: 'status="499"' in gw.metrics())
    assert breaker(gw, "base")["state"] == "closed" and breaker(gw, "base")["consecutive_failures"] == 0
    assert gw.client().chat.completions.create(model="base", messages=MESSAGES, max_tokens=2).model == "base"


@pytest.mark.slow
def test_a_caller_hanging_up_cancels_the_upstream_call(family, stub, launch_each):
    gw = launch_each(plan(family, stub), config=GatewayConfig(backend_timeout=30.0))
    stub.set("primary", mode="hang", hang=20.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "cohort/solo", "messages": MESSAGES},
                   timeout=httpx.Timeout(10, read=0.5))
    wait_for(lambda: stub.hung_up["primary"] == 1, timeout=10)
    assert breaker(gw, "remote")["consecutive_failures"] == 0


@pytest.mark.slow
def test_admin_bodies_are_bounded(gw):
    url, headers = gw.url + "/admin/routes/chat", {"Authorization": f"Bearer {TOKEN}"}
    big = json.dumps({"model": "base", "reason": "x" * (100 << 10)}).encode()
    error = error_of(httpx.post(url, content=big, headers=headers, timeout=30), 413)
    assert error["code"] == "request_too_large"
    chunked = iter([b'{"model": "base", "reason": "'] + [b"y" * 16384] * 8 + [b'"}'])
    assert httpx.post(url, content=chunked, headers=headers, timeout=30).status_code == 413
    deep = b'{"model": "base", "reason": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # under the 64 KiB limit
    assert error_of(httpx.post(url, content=deep, headers=headers, timeout=30), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url, content=b'{"model": "base", "reason": "\\ud800"}', headers=headers,
                               timeout=30), 400)["code"] == "invalid_json"
    assert gw.registry.plan_changes() == []
    assert httpx.get(gw.url + "/admin/plan", headers=headers, timeout=10).json()["plan"]["routes"]["chat"][
        "model"] == "ft1"


# -- parsing never fails with anything but the gateway's own 4xx -----------------------------------------------

CONFIG = GatewayConfig()
surrogates = st.lists(st.integers(0xD800, 0xDFFF).map(chr) | st.characters(), max_size=4).map("".join)
any_text = st.text(max_size=20) | surrogates
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]) | json_like,
                                 "content": any_text | json_like})
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["mergegate", "cohort/chat", ""]) | json_like,
     "messages": st.lists(message, max_size=3) | json_like,
     "prompt": any_text | st.lists(any_text, max_size=2) | json_like},
    optional={"max_tokens": st.integers() | json_like, "temperature": st.floats() | json_like,
              "top_p": st.floats() | json_like, "seed": st.integers() | json_like,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | json_like,
              "n": st.integers() | json_like, "stream": st.booleans() | json_like,
              "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_like) | json_like})


def _parse(raw: bytes, kind: str) -> None:
    try:
        body = parse_body(raw, kind)
        gen = to_gen_request(body, CONFIG)
    except APIError as err:
        assert 400 <= err.status < 500 and set(err.body()["error"]) == {"message", "type", "param", "code"}
        return
    p = gen.params
    assert 1 <= p.max_tokens <= CONFIG.max_tokens_limit
    assert p.temperature is None or 0 <= p.temperature <= 2
    assert p.top_p is None or 0 < p.top_p <= 1
    assert p.seed is None or -(2 ** 63) <= p.seed < 2 ** 63
    assert len(p.stop) <= 4 and all(isinstance(s, str) and s for s in p.stop)
    for text in (gen.routing_text(), gen.prompt, *(m["content"] for m in gen.messages), *p.stop):
        text.encode("utf-8")  # anything a tokenizer or an upstream will see is valid Unicode


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200), kind=st.sampled_from(["chat", "text_completion"]))
@example(raw=b"[" * 100_000, kind="chat")
@example(raw=b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}', kind="chat")
@example(raw=b'{"model": "x", "prompt": "p", "max_tokens": ' + b"7" * 5000 + b"}", kind="text_completion")
def test_parsing_any_bytes_is_a_request_or_a_4xx(raw, kind):
    _parse(raw, kind)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=plausible | json_like, kind=st.sampled_from(["chat", "text_completion"]))
def test_parsing_any_json_value_is_a_request_or_a_4xx(value, kind):
    _parse(json.dumps(value).encode(), kind)  # NaN and Infinity included: json.dumps writes them
