"""The gateway's metrics, kept and rendered by prometheus-client in a registry of each gateway's own.

Each gateway holds one `Metrics`, and with it one `CollectorRegistry`: several gateways in one process (tests, a
gateway in front of another) never share a series, and nothing goes to prometheus-client's global registry.
Durations and token counts are histograms (`_bucket`, `_sum`, `_count`): percentiles come from the buckets, over
whatever window and set of gateways the query picks, and no run's observations mix into another's.

The wrappers below take label values positionally, in the order the metric declared its labels
(`requests.inc("/v1/chat/completions", "json", "ft1", 200)`), and read counters back as numbers (`totals`) for the
code that reports them. New metrics register through `Metrics.counter`, `Metrics.gauge` and `Metrics.histogram`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, overload

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds, for every latency the gateway records: OpenTelemetry's GenAI duration buckets (0.01 … 81.92 s, each
# twice the last), widened to 5 ms below (a cached or failed-fast call) and 120 s above (a long generation). A
# superset of the convention's bounds, so OTLP and /metrics agree wherever the convention's bounds are used.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
                   120.0)
# Tokens per call: the GenAI semantic conventions' advice for gen_ai.client.token.usage
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


def _key(labels: Iterable) -> tuple[str, ...]:
    return tuple(map(str, labels))


class Counter:
    """A counter, incremented with its label values in declaration order."""

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), registry: CollectorRegistry | None = None):
        self.label_names = tuple(labels)
        self._metric = prometheus_client.Counter(name, help, self.label_names, registry=registry)
        self._sample = name.removesuffix("_total") + "_total"  # what prometheus-client names its samples

    def inc(self, *labels, amount: float = 1.0) -> None:
        (self._metric.labels(*_key(labels)) if self.label_names else self._metric).inc(amount)

    def _values(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name == self._sample:
                    yield tuple(sample.labels[n] for n in self.label_names), sample.value

    def value(self, *labels) -> float:
        key = _key(labels)
        return next((value for found, value in self._values() if found == key), 0.0)

    def totals(self, label: str) -> dict[str, float]:
        """The counter summed per value of one of its labels, over the others."""
        position = self.label_names.index(label)
        totals: dict[str, float] = {}
        for key, value in sorted(self._values()):
            totals[key[position]] = totals.get(key[position], 0.0) + value
        return totals


class Gauge:
    """A gauge the code sets, with its label values in declaration order."""

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), registry: CollectorRegistry | None = None):
        self.label_names = tuple(labels)
        self._metric = prometheus_client.Gauge(name, help, self.label_names, registry=registry)

    def _child(self, labels: tuple):
        return self._metric.labels(*_key(labels)) if self.label_names else self._metric

    def set(self, value: float, *labels) -> None:
        self._child(labels).set(value)

    def inc(self, *labels, amount: float = 1.0) -> None:
        self._child(labels).inc(amount)

    def value(self, *labels) -> float:
        key = _key(labels)
        for family in self._metric.collect():
            for sample in family.samples:
                if tuple(sample.labels[n] for n in self.label_names) == key:
                    return sample.value
        return 0.0


class Histogram:
    """A histogram, observed with its label values in declaration order after the value."""

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        self.label_names = tuple(labels)
        self._metric = prometheus_client.Histogram(name, help, self.label_names, registry=registry,
                                                   buckets=tuple(buckets))

    def observe(self, value: float, *labels) -> None:
        (self._metric.labels(*_key(labels)) if self.label_names else self._metric).observe(value)


class CallbackGauge(Collector):
    """A gauge read from a callback at scrape time: `collect()` → {label values: value}."""

    def __init__(self, name: str, help: str, labels: Iterable[str], read: Callable[[], dict[tuple, float]]):
        self.name, self.help, self.label_names, self.read = name, help, tuple(labels), read

    def describe(self) -> Iterable[Metric]:  # the registry checks names with this, without calling the callback
        return [GaugeMetricFamily(self.name, self.help, labels=self.label_names)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.help, labels=self.label_names)
        for key, value in sorted(self.read().items()):
            family.add_metric(list(_key(key)), value)
        return [family]


class Metrics:
    """Every metric one gateway exports, in its own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = self.counter("mergegate_requests_total", "Requests answered, by endpoint, cohort, "
                                     "answering model and HTTP status.", ("endpoint", "cohort", "model", "status"))
        self.request_duration = self.histogram("mergegate_request_duration_seconds", "End-to-end request time in "
                                               "the gateway.", ("endpoint", "cohort"))
        self.fallbacks = self.counter("mergegate_fallbacks_total", "Fallback triggers: a model in the chain was "
                                      "skipped or failed, by cohort, model and reason.", ("cohort", "model", "reason"))
        self.breaker_transitions = self.counter("mergegate_breaker_opened_total", "Times a backend's circuit "
                                                "breaker opened.", ("backend",))
        self.mirrors = self.counter("mergegate_mirror_total", "Mirrored requests to the candidate, by cohort and "
                                    "outcome (sent, dropped, error, recorded).", ("cohort", "outcome"))
        self.mirror_duration = self.histogram("mergegate_mirror_duration_seconds", "Time the candidate took on a "
                                              "mirrored call, answered or failed.", ("cohort", "model"))
        gen_ai = ("gen_ai_operation_name", "gen_ai_request_model", "mergegate_cohort")
        self.operation_duration = self.histogram("gen_ai_client_operation_duration_seconds", "Backend call "
                                                 "duration (gen_ai.client.operation.duration).", gen_ai)
        self.time_to_first_chunk = self.histogram("gen_ai_client_operation_time_to_first_chunk_seconds",
                                                  "Time from a streamed backend call's start to its first chunk "
                                                  "(gen_ai.client.operation.time_to_first_chunk).", gen_ai)
        self.token_usage = self.histogram("gen_ai_client_token_usage", "Tokens per backend call "
                                          "(gen_ai.client.token.usage).", (*gen_ai, "gen_ai_token_type"),
                                          buckets=TOKEN_BUCKETS)
        # routes with a strategy (ensembles.py): what answering with several models cost
        self.strategy_requests = self.counter("mergegate_strategy_requests_total", "Requests answered by a route's "
                                              "strategy, by cohort, strategy and winning model ('-': none).",
                                              ("cohort", "strategy", "winner"))
        self.strategy_calls = self.counter("mergegate_strategy_calls_total", "Upstream calls made by strategies, "
                                           "by outcome (won, answered, rejected, failed, cancelled).",
                                           ("cohort", "strategy", "model", "outcome"))
        self.strategy_extra_calls = self.counter("mergegate_strategy_extra_calls_total", "Calls strategies made "
                                                 "beyond the one a plain route makes.", ("cohort", "strategy"))
        self.strategy_extra_tokens = self.counter("mergegate_strategy_extra_tokens_total", "Tokens of strategy "
                                                  "answers that were not returned, by type (input, output).",
                                                  ("cohort", "strategy", "type"))

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        """A new counter in this gateway's registry (a name ending in `_total`; ValueError if the name is taken)."""
        return Counter(name, help, labels, self.registry)

    def histogram(self, name: str, help: str, labels: Iterable[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, help, labels, self.registry, buckets)

    @overload
    def gauge(self, name: str, help: str, labels: Iterable[str] = ..., collect: None = None) -> Gauge: ...

    @overload
    def gauge(self, name: str, help: str, labels: Iterable[str],
              collect: Callable[[], dict[tuple, float]]) -> CallbackGauge: ...

    def gauge(self, name, help, labels=(), collect=None):
        """A new gauge in this gateway's registry: one the code sets, or with `collect` ({label values: value}),
        one read from that callback at each scrape."""
        if collect is None:
            return Gauge(name, help, labels, self.registry)
        gauge = CallbackGauge(name, help, labels, collect)
        self.registry.register(gauge)
        return gauge

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: the Prometheus text format, or OpenMetrics when `accept` asks."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
