"""Tracing and GenAI metrics with OpenTelemetry.

Every backend call is a CLIENT span named "{gen_ai.operation.name} {gen_ai.request.model}" carrying the GenAI
semantic-convention attributes, the OpenInference ones (llm.model_name, llm.token_count.prompt/completion/total) for
tools that read only those, plus mergegate's routing ones; each request is a SERVER span around its calls.
Spans go over OTLP/HTTP when an endpoint is configured (the `otlp_endpoint` option, or the standard
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variables) and to a JSONL file (one span a line)
when `traces_path` is given; with neither, no span is made (a request gets OpenTelemetry's non-recording
INVALID_SPAN) and no span attribute is computed: tracing costs nothing when nothing would export it.

The histograms `gen_ai.client.operation.duration` (s), `gen_ai.client.operation.time_to_first_chunk` (s, streamed
calls) and `gen_ai.client.token.usage` (by gen_ai.token.type) are recorded through an OpenTelemetry meter when OTLP
is configured (nothing else reads it) and, for /metrics, always into the Prometheus histograms of `Metrics`, with
the same bucket bounds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Sequence

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from .metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, Metrics
from .protocol import Completion, GenRequest


class JsonlSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON object per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: ReadableSpan) -> dict:
    ctx = span.context
    duration = (span.end_time - span.start_time) / 1e9 if span.end_time and span.start_time else None
    return {
        "name": span.name, "kind": span.kind.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start_time_unix_nano": span.start_time, "end_time_unix_nano": span.end_time, "duration_s": duration,
        "status": span.status.status_code.name, "status_description": span.status.description,
        "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()},
        "resource": dict(span.resource.attributes) if span.resource else {},
    }


def otlp_endpoint_from_env() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


class Telemetry:
    def __init__(self, metrics: Metrics, *, traces_path: str | Path | None = None, otlp_endpoint: str | None = None,
                 service_name: str = "mergegate-gateway"):
        self.metrics = metrics
        resource = Resource.create({"service.name": service_name})
        self.provider = TracerProvider(resource=resource)
        readers = []
        self.otlp = bool(otlp_endpoint or otlp_endpoint_from_env())
        if self.otlp:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            base = otlp_endpoint.rstrip("/") if otlp_endpoint else None  # None: the exporters read the env
            self.provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)))
            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None)))
        self.traces_path = Path(traces_path) if traces_path else None
        if self.traces_path:
            self.provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(self.traces_path)))
        self.exporting = self.otlp or self.traces_path is not None  # spans are made only when something exports
        self.tracer = self.provider.get_tracer("mergegate.gateway")
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = self.meter_provider.get_meter("mergegate.gateway")
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="GenAI operation duration",
                                               explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS))
        self.first_chunk = meter.create_histogram("gen_ai.client.operation.time_to_first_chunk", unit="s",
                                                  description="Time to receive the first chunk of a streamed call",
                                                  explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS))
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Measures number of input and output tokens used",
                                             explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS))

    def request_span(self, method: str, path: str, request_id: str) -> trace.Span:
        if not self.exporting:
            return trace.INVALID_SPAN
        return self.tracer.start_span(f"{method} {path}", kind=SpanKind.SERVER, attributes={
            "http.request.method": method, "url.path": path, "mergegate.request_id": request_id})

    def call(self, request: GenRequest, backend, *, cohort: str, route: str, attempt: int = 0, fallback: bool = False,
             mirror: bool = False, stream: bool = False, parent: trace.Span | None = None) -> "CallRecord":
        return CallRecord(self, request, backend, cohort=cohort, route=route, attempt=attempt, fallback=fallback,
                          mirror=mirror, stream=stream, parent=parent)

    def shutdown(self) -> None:
        self.provider.shutdown()
        self.meter_provider.shutdown()


class CallRecord:
    """One backend call: its CLIENT span, and the duration and token metrics recorded when it ends."""

    def __init__(self, telemetry: Telemetry, request: GenRequest, backend, *, cohort: str, route: str, attempt: int,
                 fallback: bool, mirror: bool, stream: bool, parent: trace.Span | None):
        self.telemetry, self.backend, self.cohort = telemetry, backend, cohort
        self.operation = request.operation
        self.span = self._start_span(request, backend, cohort, route, attempt, fallback, mirror, stream, parent) \
            if telemetry.exporting else trace.INVALID_SPAN
        self.started = time.perf_counter()
        self.ended = False

    def _start_span(self, request: GenRequest, backend, cohort: str, route: str, attempt: int, fallback: bool,
                    mirror: bool, stream: bool, parent: trace.Span | None) -> trace.Span:
        p = request.params
        attributes = {
            "gen_ai.operation.name": request.operation, "gen_ai.provider.name": backend.provider,
            "gen_ai.request.model": backend.name, "gen_ai.request.max_tokens": p.max_tokens,
            "mergegate.cohort": cohort, "mergegate.route": route, "mergegate.fallback": fallback,
            "mergegate.attempt": attempt, "mergegate.mirror": mirror, "mergegate.stream": stream,
            "mergegate.backend.kind": backend.kind,
            "llm.model_name": backend.name,  # OpenInference's name for the model, beside GenAI's
        }
        optional = {"gen_ai.request.temperature": p.temperature, "gen_ai.request.top_p": p.top_p,
                    "gen_ai.request.seed": p.seed, "gen_ai.request.stop_sequences": list(p.stop) or None,
                    "mergegate.upstream_model": getattr(backend, "upstream_model", None)}
        attributes.update({k: v for k, v in optional.items() if v is not None})
        url = getattr(backend, "url", None)
        if url:
            from urllib.parse import urlsplit

            parts = urlsplit(url)
            attributes.update({"server.address": parts.hostname or "", "server.port": parts.port or 80})
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self.telemetry.tracer.start_span(f"{request.operation} {backend.name}", context=context,
                                                kind=SpanKind.CLIENT, attributes=attributes)

    def succeed(self, completion: Completion, checks: dict | None = None, failed_check: str | None = None) -> None:
        span = self.span
        if not span.is_recording():
            self._end(completion)
            return
        span.set_attributes({
            "gen_ai.response.model": completion.response_model or self.backend.name,
            "gen_ai.response.id": completion.response_id,
            "gen_ai.usage.input_tokens": completion.prompt_tokens,
            "gen_ai.usage.output_tokens": completion.completion_tokens,
            "gen_ai.response.finish_reasons": [completion.finish_reason],
            # the same counts under OpenInference's names, for tools (Phoenix, Arize) that read only those
            "llm.token_count.prompt": completion.prompt_tokens,
            "llm.token_count.completion": completion.completion_tokens,
            "llm.token_count.total": completion.prompt_tokens + completion.completion_tokens,
        })
        for name, result in (checks or {}).items():
            span.set_attribute(f"mergegate.check.{name}", bool(result["passed"]))
            if "refused" in result:
                span.set_attribute("mergegate.refused", bool(result["refused"]))
        if failed_check:
            span.set_attribute("error.type", "check_failed")
            span.set_status(Status(StatusCode.ERROR, f"online check '{failed_check}' failed"))
        self._end(completion)

    def first_chunk(self) -> None:
        """A streamed call's first chunk arrived: its time since the call started (its wait for a slot included)."""
        t = self.telemetry
        seconds = time.perf_counter() - self.started
        if t.otlp:
            t.first_chunk.record(seconds, {"gen_ai.operation.name": self.operation, "gen_ai.request.model":
                                           self.backend.name, "mergegate.cohort": self.cohort})
        t.metrics.time_to_first_chunk.observe(seconds, self.operation, self.backend.name, self.cohort)

    def fail(self, error_type: str, message: str) -> None:
        if self.ended:
            return
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR, message[:500]))
        self._end(None, error_type)

    def _end(self, completion: Completion | None, error_type: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        seconds = time.perf_counter() - self.started
        self.span.end()
        t, m = self.telemetry, self.telemetry.metrics
        attrs = {"gen_ai.operation.name": self.operation, "gen_ai.provider.name": self.backend.provider,
                 "gen_ai.request.model": self.backend.name, "mergegate.cohort": self.cohort}
        if error_type:
            attrs["error.type"] = error_type
        if t.otlp:
            t.duration.record(seconds, attrs)
        m.operation_duration.observe(seconds, self.operation, self.backend.name, self.cohort)
        if completion is not None:
            for kind, count in (("input", completion.prompt_tokens), ("output", completion.completion_tokens)):
                if t.otlp:
                    t.tokens.record(count, {**attrs, "gen_ai.token.type": kind})
                m.token_usage.observe(count, self.operation, self.backend.name, self.cohort, kind)
