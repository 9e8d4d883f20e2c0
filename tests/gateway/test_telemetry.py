"""Spans cost nothing when nothing exports them: a gateway with neither a traces file nor an OTLP endpoint makes
no span (a processor listening on its provider sees none) yet still records its /metrics histograms."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import SpanProcessor

from mergegate.gateway import create_app
from mergegate.gateway.metrics import Metrics
from mergegate.gateway.telemetry import Telemetry
from mergegate.gateway.testing import ServerThread
from mergegate.registry import Registry
from mergegate.rollout import RolloutPlan

from .helpers import MESSAGES, sample_sum


class StartedSpans(SpanProcessor):
    def __init__(self):
        self.names: list[str] = []

    def on_start(self, span, parent_context=None) -> None:
        self.names.append(span.name)


def test_request_spans_record_only_when_something_exports(tmp_path):
    quiet = Telemetry(Metrics())
    assert not quiet.request_span("POST", "/v1/chat/completions", "r1").is_recording()
    traced = Telemetry(Metrics(), traces_path=tmp_path / "traces.jsonl")
    span = traced.request_span("POST", "/v1/chat/completions", "r2")
    assert span.is_recording()
    span.end()
    traced.shutdown()
    quiet.shutdown()


def test_a_gateway_without_exporters_makes_no_spans_but_keeps_its_metrics(stub, tmp_path):
    plan = RolloutPlan.model_validate({"candidate": "up", "models": {"up": {"role": "candidate", "url": stub.url}},
                                       "routes": {}, "default": {"model": "up"}})
    app = create_app(plan, registry=Registry(tmp_path / "registry.sqlite"))
    listener = StartedSpans()
    app.state.gateway.telemetry.provider.add_span_processor(listener)
    with ServerThread(app) as server:
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                            json={"model": "mergegate", "messages": MESSAGES, "max_tokens": 3})
        assert answer.status_code == 200, answer.text
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert listener.names == []
    assert sample_sum(metrics, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat",
                      gen_ai_request_model="up", mergegate_cohort="default") == 1, metrics
