"""The gateway end to end: a real uvicorn server on 127.0.0.1 over tiny in-process models, a real stub upstream,
driven by the official openai client (and httpx for raw requests). Fixtures: tests/gateway/conftest.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI, Request

from mergegate.gateway import GatewayConfig
from mergegate.gateway.testing import ServerThread

from .helpers import MESSAGES, buckets, route_of, sample_sum, samples, wait_for

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow,  # every test talks to a live server
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # transformers' own, raised by PEFT loading


# -- the module's gateway ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_adapter(family, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter on the base, with random (non-zero) B matrices so it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gw(family, stub, launch, lora_adapter):
    plan = {
        "candidate": "cand",
        "models": {
            "base": {"role": "base", "path": str(family["base"])},
            "ft1": {"path": str(family["ft1"])},
            "ft2": {"path": str(family["ft2"])},
            "cand": {"role": "candidate", "path": str(family["ft3"])},
            "lora": {"path": str(family["base"]), "adapter": str(lora_adapter)},
            "remote": {"url": stub.url, "upstream_model": "primary"},
            "remote_b": {"url": stub.url, "upstream_model": "secondary"},
        },
        "routes": {
            "chat": {"model": "ft1", "fallback": ["base"]},
            "code": {"model": "ft2", "fallback": ["base"]},
            "json": {"model": "remote", "fallback": ["remote_b"], "check": "json_valid"},
            "tools": {"model": "remote", "fallback": ["remote_b"], "check": "tool_selection",
                      "tools": ["search", "calculator"]},
            "safety": {"model": "remote", "fallback": ["base"], "check": "refusal"},
        },
        "default": {"model": "base"},
    }
    return launch(plan, config=GatewayConfig(max_prompt_tokens=200, max_body_bytes=20_000, max_tokens_limit=64))


def chat(gw, cohort: str | None = None, *, max_tokens: int = 8, raw: bool = True, **kw):
    headers = {"X-Cohort": cohort} if cohort else {}
    create = gw.client().chat.completions.with_raw_response.create
    response = create(model=kw.pop("model", "mergegate"), messages=kw.pop("messages", MESSAGES),
                      max_tokens=max_tokens, extra_headers=headers, **kw)
    return response if raw else response.parse()


# -- API basics --------------------------------------------------------------------------------------------------

def test_chat_completion_has_openai_shape_usage_and_route_header(gw):
    response = chat(gw, "chat")
    answer = response.parse()
    assert answer.model == "ft1"
    assert answer.id.startswith("chatcmpl-")
    assert answer.choices[0].finish_reason in ("length", "stop")
    text = answer.choices[0].message.content
    assert isinstance(text, str) and answer.choices[0].message.role == "assistant"
    prompt = "user: hello there\nassistant:"  # no chat template: "role: content" lines + "assistant:"
    tokenizer = gw.gateway.backends["ft1"].tokenizer
    assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert 1 <= answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    route = route_of(response.headers)
    assert route == {"cohort": "chat", "source": "header", "model": "ft1", "fallback": "false", "attempt": "0"}
    assert response.headers["x-request-id"] == answer.id


def test_routing_by_header_metadata_virtual_model_and_pinned_model(gw):
    assert route_of(chat(gw, "code").headers)["model"] == "ft2"
    # OpenAI's `metadata` field (sent as extra_body so that older clients without the keyword work too)
    meta = route_of(chat(gw, extra_body={"metadata": {"cohort": "code"}}).headers)
    assert (meta["cohort"], meta["source"], meta["model"]) == ("code", "metadata", "ft2")
    both = chat(gw, "chat", extra_body={"metadata": {"cohort": "code"}})
    assert route_of(both.headers)["model"] == "ft1"  # the header wins
    virtual = route_of(chat(gw, model="cohort/code").headers)
    assert (virtual["source"], virtual["model"]) == ("model", "ft2")
    unknown = route_of(chat(gw, "no-such-cohort").headers)  # an unrouted cohort is ignored → default
    assert (unknown["cohort"], unknown["model"]) == ("default", "base")
    nothing = route_of(chat(gw).headers)
    assert (nothing["cohort"], nothing["source"], nothing["model"]) == ("default", "default", "base")
    pinned = chat(gw, "chat", model="ft2")  # a plan model by name goes to that model directly
    assert route_of(pinned.headers)["source"] == "pinned" and pinned.parse().model == "ft2"


def test_greedy_answers_are_deterministic(gw):
    first = chat(gw, "chat", raw=False).choices[0].message.content
    again = chat(gw, "chat", raw=False).choices[0].message.content
    assert first == again


def test_text_completion_honours_stop_sequences(gw):
    client = gw.client()
    full = client.completions.create(model="cohort/chat", prompt="The answer is", max_tokens=12)
    assert full.object == "text_completion" and full.model == "ft1"
    text = full.choices[0].text
    assert len(text) >= 6
    stop = text[3:5]
    cut = text.find(stop)
    stopped = client.completions.create(model="cohort/chat", prompt="The answer is", max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="cohort/chat", prompt="The answer is", max_tokens=12, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:cut]


@pytest.mark.parametrize("cohort", ["chat", "code"])
def test_streaming_reassembles_to_the_non_streaming_greedy_text(gw, cohort):
    client = gw.client()
    plain = client.chat.completions.create(model=f"cohort/{cohort}", messages=MESSAGES, max_tokens=12)
    chunks = list(client.chat.completions.create(model=f"cohort/{cohort}", messages=MESSAGES, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed, token by token
    assert "".join(deltas) == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert {c.model for c in chunks} == {plain.model}
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_client_leaving_mid_stream_frees_the_model_for_the_next_request(gw):
    body = {"model": "cohort/code", "messages": MESSAGES, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) is not None  # then hang up
    started = time.monotonic()
    assert chat(gw, "code", raw=False).model == "ft2"
    assert time.monotonic() - started < 10
    wait_for(lambda: sample_sum(gw.metrics(), "mergegate_requests_total", endpoint="/v1/chat/completions",
                                cohort="code", model="ft2", status="499") >= 1)
    assert gw.gateway.backends["ft2"]._pending == 0


def test_sse_wire_format_ends_with_done(gw):
    body = {"model": "cohort/chat", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert route_of(response.headers)["model"] == "ft1"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_models_lists_plan_models_and_cohort_routes(gw):
    ids = {m.id for m in gw.client().models.list()}
    assert {"base", "ft1", "ft2", "cand", "lora", "remote", "remote_b"} <= ids
    assert {"mergegate", "cohort/chat", "cohort/json", "cohort/default"} <= ids
    assert gw.client().models.retrieve("cohort/json").id == "cohort/json"


def test_a_plan_model_with_a_peft_adapter_loads_base_plus_adapter(gw):
    base = chat(gw, model="base", max_tokens=12, raw=False).choices[0].message.content
    adapted = chat(gw, model="lora", max_tokens=12, raw=False)
    assert adapted.model == "lora" and adapted.choices[0].message.content != base
    health = httpx.get(gw.url + "/healthz", timeout=10).json()["backends"]["lora"]
    assert health["adapter"] and health["loaded"]


def test_sampling_with_a_seed_is_reproducible(gw):
    one = chat(gw, "chat", max_tokens=12, temperature=1.5, seed=7, raw=False).choices[0].message.content
    two = chat(gw, "chat", max_tokens=12, temperature=1.5, seed=7, raw=False).choices[0].message.content
    greedy = chat(gw, "chat", max_tokens=12, raw=False).choices[0].message.content
    assert one == two and one != greedy


def test_healthz_reports_each_backend(gw):
    body = httpx.get(gw.url + "/healthz", timeout=10).json()
    assert body["status"] == "ok"
    assert body["backends"]["ft1"]["kind"] == "local" and body["backends"]["ft1"]["loaded"] is True
    assert body["backends"]["remote"]["kind"] == "remote" and body["backends"]["remote"]["state"] == "closed"


# -- 4xx ---------------------------------------------------------------------------------------------------------

def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_requests_get_clear_openai_style_errors(gw):
    url = gw.url + "/v1/chat/completions"
    error = _error(httpx.post(url, content=b'{"model": "mergegate", "messages": [', timeout=10), 400)
    assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]
    error = _error(httpx.post(url, json=[1, 2], timeout=10), 400)
    assert "JSON object" in error["message"]
    error = _error(httpx.post(url, json={"model": "mergegate"}, timeout=10), 400)
    assert error["param"] == "messages" and error["code"] == "missing_required_parameter"
    error = _error(httpx.post(url, json={"model": "mergegate", "messages": []}, timeout=10), 400)
    assert error["param"] == "messages"
    error = _error(httpx.post(url, json={"model": "mergegate", "messages": [{"role": "wizard", "content": "x"}]},
                              timeout=10), 400)
    assert error["param"] == "messages.0.role"
    error = _error(httpx.post(url, json={"model": "mergegate", "messages": MESSAGES, "n": 2}, timeout=10), 400)
    assert error["param"] == "n" and "n=1" in error["message"]
    error = _error(httpx.post(url, json={"model": "mergegate", "messages": MESSAGES, "max_tokens": 10_000},
                              timeout=10), 400)
    assert error["param"] == "max_tokens" and "64" in error["message"]
    error = _error(httpx.post(gw.url + "/v1/completions", json={"model": "mergegate", "prompt": [1, 2, 3]},
                              timeout=10), 400)
    assert error["param"] == "prompt"
    error = _error(httpx.get(gw.url + "/v1/nothing-here", timeout=10), 404)
    assert "/v1/nothing-here" in error["message"]


def test_unknown_model_is_404_through_the_openai_client(gw):
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert "gpt-4o" in caught.value.message and "cohort/chat" in caught.value.message
    assert caught.value.code == "model_not_found"


def test_oversize_prompt_and_body_are_refused(gw):
    with pytest.raises(openai.BadRequestError) as caught:  # 201+ tokens, under the byte limit
        gw.client().chat.completions.create(model="cohort/chat", messages=[{"role": "user", "content": "x" * 300}])
    assert caught.value.code == "context_length_exceeded"
    assert "200" in caught.value.message
    huge = {"model": "mergegate", "messages": [{"role": "user", "content": "y" * 30_000}]}
    error = _error(httpx.post(gw.url + "/v1/chat/completions", json=huge, timeout=10), 413)
    assert error["code"] == "request_too_large" and "20000" in error["message"]


# -- online checks -----------------------------------------------------------------------------------------------

def test_json_check_failure_falls_back_to_the_next_model(gw, stub):
    stub.set("primary", reply="Sure! Here is your data: name=Ada")
    stub.set("secondary", reply='{"name": "Ada"}')
    response = chat(gw, "json")
    assert response.parse().choices[0].message.content == '{"name": "Ada"}'
    assert response.parse().model == "remote_b"
    route = route_of(response.headers)
    assert route["model"] == "remote_b" and route["fallback"] == "true" and route["attempt"] == "1"
    assert route["skipped"] == "remote:check:json_valid"
    # streaming on a checked route is buffered: the same checked answer, in chunks
    chunks = gw.client().chat.completions.create(model="cohort/json", messages=MESSAGES, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == '{"name": "Ada"}'
    stub.set("primary", reply='{"name": "Grace"}')
    answer = chat(gw, "json", raw=False)
    assert (answer.model, answer.choices[0].message.content) == ("remote", '{"name": "Grace"}')


def test_tool_selection_check_needs_a_listed_tool_first(gw, stub):
    stub.set("primary", reply="weather tomorrow")
    stub.set("secondary", reply="search best pizza")
    answer = chat(gw, "tools", raw=False)
    assert answer.model == "remote_b"
    stub.set("primary", reply="calculator 2+2")
    assert chat(gw, "tools", raw=False).model == "remote"


def test_tool_selection_check_accepts_call_forms_and_openai_tool_calls(gw, stub):
    stub.set("primary", reply='search(query="best pizza")')
    assert chat(gw, "tools", raw=False).model == "remote"
    call = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}
    stub.set("primary", reply=json.dumps({"tool_calls": [call]}))
    assert chat(gw, "tools", max_tokens=64, raw=False).model == "remote"
    stub.set("primary", reply='{"name": "weather", "arguments": {}}')  # not a listed tool: fall back
    stub.set("secondary", reply="search pizza")
    assert chat(gw, "tools", max_tokens=64, raw=False).model == "remote_b"


def test_refusal_is_recorded_but_does_not_fall_over(gw, stub):
    stub.set("primary", reply="I'm sorry, but I can't help with that.")
    response = chat(gw, "safety")
    assert response.parse().model == "remote" and route_of(response.headers)["fallback"] == "false"
    span = [s for s in gw.spans() if s["kind"] == "CLIENT" and s["attributes"]["mergegate.cohort"] == "safety"][-1]
    assert span["attributes"]["mergegate.refused"] is True
    assert span["attributes"]["mergegate.check.refusal"] is False  # recorded as a failed check, answered anyway


def test_all_models_failing_is_a_502_naming_each(gw, stub):
    stub.set("primary", reply="not json")
    stub.set("secondary", reply="still not json")
    with pytest.raises(openai.InternalServerError) as caught:
        chat(gw, "json")
    assert caught.value.status_code == 502
    assert "remote: check:json_valid" in caught.value.message and "remote_b: check:json_valid" in caught.value.message


# -- traces and metrics ------------------------------------------------------------------------------------------

def test_traces_carry_gen_ai_attributes_and_token_counts(gw, stub):
    answer = chat(gw, "code", max_tokens=6, raw=False)
    stub.set("primary", reply="plain words")
    stub.set("secondary", reply='{"ok": 1}')
    chat(gw, "json")
    spans = gw.spans()
    client = [s for s in spans if s["kind"] == "CLIENT"]
    mine = [s for s in client if s["attributes"]["gen_ai.request.model"] == "ft2"][-1]
    a = mine["attributes"]
    assert mine["name"] == "chat ft2"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "mergegate.local"
    assert a["gen_ai.response.model"] == "ft2" and a["gen_ai.response.id"]
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [answer.choices[0].finish_reason]
    assert (a["mergegate.cohort"], a["mergegate.route"], a["mergegate.fallback"]) == ("code", "code", False)
    server = next(s for s in spans if s["span_id"] == mine["parent_span_id"])
    assert server["kind"] == "SERVER" and server["attributes"]["mergegate.request_id"] == answer.id
    failed, answered = [s for s in client if s["attributes"]["mergegate.cohort"] == "json"][-2:]
    assert failed["name"] == "chat remote" and failed["attributes"]["error.type"] == "check_failed"
    assert failed["attributes"]["gen_ai.provider.name"] == "openai"
    assert failed["attributes"]["gen_ai.response.model"] == "primary"  # what the upstream reported
    assert failed["status"] == "ERROR"
    assert answered["attributes"]["mergegate.fallback"] is True and answered["attributes"]["mergegate.attempt"] == 1
    assert answered["attributes"]["gen_ai.usage.output_tokens"] == 3  # the stub counts 4-character chunks
    assert failed["trace_id"] == answered["trace_id"]  # one request, one trace


def test_client_spans_also_carry_openinference_names(gw, stub):
    answer = chat(gw, "code", max_tokens=6, raw=False)
    a = [s for s in gw.spans() if s["kind"] == "CLIENT" and s["attributes"]["gen_ai.request.model"] == "ft2"][-1][
        "attributes"]
    assert a["llm.model_name"] == a["gen_ai.request.model"] == "ft2"
    assert a["llm.token_count.prompt"] == a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["llm.token_count.completion"] == a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["llm.token_count.total"] == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_metrics_expose_fallbacks_breakers_and_latency_histograms(gw, stub):
    chat(gw, "chat")
    stub.set("primary", reply="nope")
    stub.set("secondary", reply="{}")
    chat(gw, "json")
    text = gw.metrics()
    assert "# TYPE mergegate_fallbacks_total counter" in text
    assert sample_sum(text, "mergegate_fallbacks_total", cohort="json", model="remote", reason="check:json_valid") >= 1
    assert "# TYPE gen_ai_client_operation_duration_seconds histogram" in text
    assert sample_sum(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="ft1") >= 1
    tokens = buckets(text, "gen_ai_client_token_usage", gen_ai_operation_name="chat", gen_ai_request_model="ft1",
                     mergegate_cohort="chat", gen_ai_token_type="input")
    assert tokens and tokens[float("inf")] >= 1
    assert samples(text, "mergegate_breaker_state", backend="remote") == [({"backend": "remote"}, 0.0)]
    assert buckets(text, "mergegate_request_duration_seconds", endpoint="/v1/chat/completions",
                   cohort="chat")[float("inf")] >= 1


def test_spans_go_to_an_otlp_http_collector_when_one_is_configured(family, launch_each):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, str, bytes]] = []
    collector = FastAPI()

    @collector.post("/v1/{signal}")
    async def export(signal: str, request: Request):
        received.append((signal, request.headers.get("content-type", ""), await request.body()))
        return {}

    with ServerThread(collector) as otlp:
        plan = {"candidate": "base", "models": {"base": {"role": "base", "path": str(family["base"])}},
                "routes": {}, "default": {"model": "base"}}
        gw = launch_each(plan, otlp_endpoint=otlp.url)
        answer = chat(gw, max_tokens=3, raw=False)
        gw.server.stop()  # shutdown flushes the batch span processor and the metric reader
        traces = [body for signal, kind, body in received if signal == "traces"]
        assert traces and all(kind == "application/x-protobuf" for signal, kind, _ in received)
        assert {signal for signal, _, _ in received} == {"traces", "metrics"}
    exported = ExportTraceServiceRequest()
    exported.ParseFromString(traces[0])
    spans = [span for rs in exported.resource_spans for ss in rs.scope_spans for span in ss.spans]
    client = next(span for span in spans if span.name == "chat base")
    attributes = {a.key: a.value for a in client.attributes}
    assert attributes["gen_ai.usage.output_tokens"].int_value == answer.usage.completion_tokens
    assert attributes["gen_ai.provider.name"].string_value == "mergegate.local"
