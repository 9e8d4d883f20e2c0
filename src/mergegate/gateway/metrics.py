"""In-process metrics, rendered by hand in the Prometheus text format (version 0.0.4).

Counters and gauges keyed by label values; summaries keep the last `window` observations per series and
report p50/p99 (plus _sum and _count over all observations) at scrape time.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from typing import Callable, Iterable

QUANTILES = (0.5, 0.99)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def render(self) -> list[str]:
        raise NotImplementedError

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple, float] = defaultdict(float)

    def inc(self, *labels, amount: float = 1.0) -> None:
        with self._lock:
            self._values[tuple(map(str, labels))] += amount

    def value(self, *labels) -> float:
        return self._values.get(tuple(map(str, labels)), 0.0)

    def totals(self, label: str) -> dict[str, float]:
        """The counter summed per value of one of its labels, over the others (what the series render to)."""
        position = self.label_names.index(label)
        with self._lock:
            items = sorted(self._values.items())
        totals: dict[str, float] = {}
        for key, value in items:
            totals[key[position]] = totals.get(key[position], 0.0) + value
        return totals

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read from a callback at scrape time: `collect()` → {label values: value}."""

    kind = "gauge"

    def __init__(self, name, help, labels, collect: Callable[[], dict[tuple, float]]):
        super().__init__(name, help, labels)
        self.collect = collect

    def render(self) -> list[str]:
        items = sorted(self.collect().items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Summary(_Metric):
    kind = "summary"

    def __init__(self, name, help, labels=(), window: int = 2048):
        super().__init__(name, help, labels)
        self.window = window
        self._recent: dict[tuple, deque] = {}
        self._sum: dict[tuple, float] = defaultdict(float)
        self._count: dict[tuple, int] = defaultdict(int)

    def observe(self, value: float, *labels) -> None:
        key = tuple(map(str, labels))
        with self._lock:
            self._recent.setdefault(key, deque(maxlen=self.window)).append(value)
            self._sum[key] += value
            self._count[key] += 1

    def quantiles(self, *labels) -> dict[float, float]:
        with self._lock:
            values = sorted(self._recent.get(tuple(map(str, labels)), ()))
        return {q: quantile(values, q) for q in QUANTILES}

    def render(self) -> list[str]:
        with self._lock:
            series = {k: (sorted(v), self._sum[k], self._count[k]) for k, v in sorted(self._recent.items())}
        lines = self.header()
        for key, (values, total, count) in series.items():
            for q in QUANTILES:
                labels = _labels(self.label_names, key, 'quantile="%s"' % q)
                lines.append(f"{self.name}{labels} {_number(quantile(values, q))}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {count}")
        return lines


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self, window: int = 2048):
        self.requests = Counter("mergegate_requests_total", "Requests answered, by endpoint, cohort, answering "
                                "model and HTTP status.", ("endpoint", "cohort", "model", "status"))
        self.request_duration = Summary("mergegate_request_duration_seconds", "End-to-end request time in the "
                                        "gateway.", ("endpoint", "cohort"), window)
        self.fallbacks = Counter("mergegate_fallbacks_total", "Fallback triggers: a model in the chain was skipped "
                                 "or failed, by cohort, model and reason.", ("cohort", "model", "reason"))
        self.breaker_transitions = Counter("mergegate_breaker_opened_total", "Times a backend's circuit breaker "
                                           "opened.", ("backend",))
        self.mirrors = Counter("mergegate_mirror_total", "Mirrored requests to the candidate, by cohort and outcome "
                               "(sent, dropped, error, recorded).", ("cohort", "outcome"))
        self.operation_duration = Summary("gen_ai_client_operation_duration_seconds", "Backend call duration "
                                          "(gen_ai.client.operation.duration).",
                                          ("gen_ai_operation_name", "gen_ai_request_model", "mergegate_cohort"), window)
        self.token_usage = Summary("gen_ai_client_token_usage", "Tokens per backend call (gen_ai.client.token.usage).",
                                   ("gen_ai_operation_name", "gen_ai_request_model", "mergegate_cohort",
                                    "gen_ai_token_type"), window)
        # routes with a strategy (ensembles.py): what answering with several models cost
        self.strategy_requests = Counter("mergegate_strategy_requests_total", "Requests answered by a route's "
                                         "strategy, by cohort, strategy and winning model ('-': none).",
                                         ("cohort", "strategy", "winner"))
        self.strategy_calls = Counter("mergegate_strategy_calls_total", "Upstream calls made by strategies, by "
                                      "outcome (won, answered, rejected, failed, cancelled).",
                                      ("cohort", "strategy", "model", "outcome"))
        self.strategy_extra_calls = Counter("mergegate_strategy_extra_calls_total", "Calls strategies made beyond "
                                            "the one a plain route makes.", ("cohort", "strategy"))
        self.strategy_extra_tokens = Counter("mergegate_strategy_extra_tokens_total", "Tokens of strategy answers "
                                             "that were not returned, by type (input, output).",
                                             ("cohort", "strategy", "type"))
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, labels: tuple[str, ...], collect: Callable[[], dict[tuple, float]]):
        self.gauges.append(Gauge(name, help, labels, collect))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.request_duration, self.fallbacks, self.breaker_transitions, self.mirrors,
                       self.operation_duration, self.token_usage, self.strategy_requests, self.strategy_calls,
                       self.strategy_extra_calls, self.strategy_extra_tokens, *self.gauges):
            lines += metric.render()
        return "\n".join(lines) + "\n"
