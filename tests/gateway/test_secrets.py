"""An upstream's credentials never leave the gateway: an upstream that quotes the API key it received (in a 401's
message, in an error event mid-stream, in its /tokenize refusal) has the key redacted — and its text bounded —
wherever that text goes: the caller's error body, the stream's error event, the traces file and the registry's
mirrored results. Over the stub upstream on 127.0.0.1."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from mergegate.gateway import GatewayConfig
from mergegate.serving.bounds import upstream_text

from .helpers import MESSAGES, wait_for

pytestmark = [pytest.mark.one_torch_thread]


@pytest.fixture
def key(monkeypatch) -> str:
    value = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("STUB_API_KEY", value)
    return value


def leaked(text: str, key: str) -> bool:
    """Whether `text` shows the key, or any 8 characters of it in a row."""
    return any(key[i:i + 8] in text for i in range(len(key) - 7))


@pytest.mark.slow
def test_an_upstream_quoting_its_key_has_it_redacted_in_answers_traces_and_the_registry(stub, launch_each, key):
    stub.set("keyed", mode="unauthorized")
    stub.set("streamer", mode="stream_error", reply="first chunk, then an error event")
    stub.set("good", reply="fine")
    keyed = {"url": stub.url, "api_key_env": "STUB_API_KEY"}
    gw = launch_each({
        "candidate": "keyed",
        "models": {"keyed": {**keyed, "upstream_model": "keyed", "role": "candidate"},
                   "streamer": {**keyed, "upstream_model": "streamer"},
                   "good": {"url": stub.url, "upstream_model": "good"}},
        "routes": {"mirrored": {"model": "good", "mirror": 1.0}},
        "default": {"model": "keyed"}}, config=GatewayConfig(breaker_failures=1000))
    shown: list[str] = []

    answer = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                        json={"model": "keyed", "messages": MESSAGES, "max_tokens": 8})
    assert answer.status_code == 502 and "HTTP 401" in answer.json()["error"]["message"]
    assert "Incorrect API key provided: [redacted]" in answer.json()["error"]["message"]
    shown.append(answer.text)

    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30, json={
            "model": "streamer", "messages": MESSAGES, "max_tokens": 8, "stream": True}) as stream:
        events = stream.read().decode()
    assert "stream_interrupted" in events and "[redacted]" in events
    shown.append(events)

    refused = httpx.post(gw.url + "/tokenize", timeout=30, json={"model": "keyed", "prompt": "hi"})
    assert refused.status_code == 502 and "[redacted]" in refused.json()["error"]["message"]
    shown.append(refused.text)

    mirrored = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                          json={"model": "cohort/mirrored", "messages": MESSAGES, "max_tokens": 8})
    assert mirrored.status_code == 200
    results = wait_for(lambda: gw.registry.mirror_results())
    assert "HTTP 401" in results[0]["mirror_error"]
    wait_for(lambda: sum(s["kind"] == "CLIENT" for s in gw.spans()) >= 4)  # every upstream call's span is written

    shown += [json.dumps(results), gw.traces.read_text(), httpx.get(gw.url + "/healthz", timeout=10).text]
    for text in shown:
        assert not leaked(text, key), text
    assert stub.calls["keyed"] >= 2  # the key was sent: the upstream had it to quote


def test_upstream_text_redacts_each_secret_whole_or_in_part_and_bounds_the_rest():
    key = "sk-live-0123456789abcdefghij"
    body = json.dumps({"error": f"bad key {key}; it starts {key[:10]}, ends {key[-9:]}; Bearer other-token-xyz"})
    text = upstream_text(body.encode(), [key, None])
    assert not leaked(text, key) and "other-token-xyz" not in text
    assert "[redacted]" in text and "bad key" in text
    assert len(upstream_text("x" * 10_000, [key])) <= 300 + 1  # bounded, the cut marked with one character
    cut = upstream_text("." * 295 + key, [key])  # a key that straddles the bound is found whole first
    assert not leaked(cut, key)
    assert upstream_text("plain\nmultiline\ttext", []) == "plain multiline text"  # one line
