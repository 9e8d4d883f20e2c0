"""The gateway's metrics: real Prometheus histograms, counters and gauges in a registry of each gateway's own,
rendered by prometheus-client at /metrics, and readable as numbers by the code that needs them."""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mergegate.gateway.metrics import LATENCY_BUCKETS, Counter, Metrics

from .helpers import MESSAGES, buckets, sample_sum, samples, wait_for

pytestmark = pytest.mark.one_torch_thread

CHAT = "/v1/chat/completions"


def text_of(metrics: Metrics) -> str:
    body, _ = metrics.render()
    return body.decode()


def test_a_counter_sums_per_value_of_one_label_over_the_others():
    calls = Counter("calls_total", "calls", ("cohort", "strategy", "winner"))
    calls.inc("json", "cascade", "merged")
    calls.inc("json", "cascade", "specialist", amount=2)
    calls.inc("tools", "vote", "merged", amount=0.5)
    assert calls.totals("cohort") == {"json": 3.0, "tools": 0.5}
    assert calls.totals("winner") == {"merged": 1.5, "specialist": 2.0}
    assert calls.value("json", "cascade", "specialist") == 2.0 and calls.value("none", "vote", "merged") == 0.0
    assert Counter("empty_total", "nothing", ("cohort",)).totals("cohort") == {}


def test_request_durations_are_a_histogram_whose_cumulative_buckets_span_llm_latencies():
    metrics = Metrics()
    for seconds in (0.003, 0.3, 3.0, 300.0):
        metrics.request_duration.observe(seconds, CHAT, "json")
    text = text_of(metrics)
    family = next(f for f in text_string_to_metric_families(text) if f.name == "mergegate_request_duration_seconds")
    assert family.type == "histogram"
    counts = buckets(text, "mergegate_request_duration_seconds", endpoint=CHAT, cohort="json")
    assert list(counts) == [*LATENCY_BUCKETS, math.inf]
    assert LATENCY_BUCKETS[0] <= 0.005 and LATENCY_BUCKETS[-1] >= 120
    assert (counts[0.005], counts[0.32], counts[5.12], counts[120.0], counts[math.inf]) == (1, 2, 3, 3, 4)
    assert sample_sum(text, "mergegate_request_duration_seconds_count", cohort="json") == 4
    assert sample_sum(text, "mergegate_request_duration_seconds_sum", cohort="json") == pytest.approx(303.303)
    assert "quantile" not in text  # no summaries: percentiles come from the buckets, over any window one picks


def test_two_metrics_objects_in_one_process_share_no_values():
    first, second = Metrics(), Metrics()  # a second registry of the same names: no clash, no shared series
    first.requests.inc(CHAT, "json", "ft1", 200)
    first.request_duration.observe(0.5, CHAT, "json")
    first.token_usage.observe(12, "chat", "ft1", "json", "input")
    assert first.requests.totals("cohort") == {"json": 1.0} and second.requests.totals("cohort") == {}
    text = text_of(second)
    assert samples(text, "mergegate_requests_total") == []
    assert samples(text, "mergegate_request_duration_seconds_count") == []
    assert samples(text, "gen_ai_client_token_usage_count") == []
    assert sample_sum(text_of(first), "gen_ai_client_token_usage_bucket", gen_ai_token_type="input", le="16.0") == 1


def test_new_labelled_counters_and_gauges_register_on_a_gateways_metrics():
    metrics = Metrics()
    decisions = metrics.counter("mergegate_live_decisions_total", "Live decisions.", ("cohort", "decision"))
    decisions.inc("json", "promote")
    drift = metrics.gauge("mergegate_drift_detected", "1 when a drop is established.", ("model", "cohort"))
    drift.set(1, "ft1", "json")
    drift.set(0, "ft1", "chat")
    phases = {("json",): 2.0}
    metrics.gauge("mergegate_live_phase", "The cohort's phase.", ("cohort",), collect=lambda: phases)
    phases[("chat",)] = 1.0  # read at scrape time
    text = text_of(metrics)
    assert sample_sum(text, "mergegate_live_decisions_total", cohort="json", decision="promote") == 1
    assert samples(text, "mergegate_drift_detected", cohort="json") == [({"model": "ft1", "cohort": "json"}, 1.0)]
    assert drift.value("ft1", "chat") == 0.0
    assert {found["cohort"]: value for found, value in samples(text, "mergegate_live_phase")} == {
        "json": 2.0, "chat": 1.0}
    with pytest.raises(ValueError, match="mergegate_live_phase"):  # one name, one metric
        metrics.gauge("mergegate_live_phase", "again", ("cohort",))


def test_metrics_are_rendered_in_the_text_format_or_openmetrics_when_asked():
    metrics = Metrics()
    metrics.requests.inc(CHAT, "json", "ft1", 200)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert sample_sum(body.decode(), "mergegate_requests_total") == 1
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


# -- through the gateway ---------------------------------------------------------------------------------------------

def stub_plan(stub) -> dict:
    return {"candidate": "cand",
            "models": {"up": {"url": stub.url, "upstream_model": "primary"},
                       "cand": {"role": "candidate", "url": stub.url, "upstream_model": "candidate"}},
            "routes": {}, "default": {"model": "up", "mirror": 1.0}}


def ask(gw, *, stream: bool = False) -> None:
    answer = httpx.post(gw.url + CHAT, timeout=30, json={"model": "mergegate", "messages": MESSAGES,
                                                         "max_tokens": 4, "stream": stream})
    assert answer.status_code == 200, answer.text


def scrape(gw) -> str:
    response = httpx.get(gw.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


@pytest.mark.slow
def test_metrics_endpoint_counts_and_fills_histograms_per_gateway(stub, launch_each):
    first, second = launch_each(stub_plan(stub)), launch_each(stub_plan(stub))
    for _ in range(3):
        ask(first)
    ask(second)
    text = scrape(first)
    assert sample_sum(text, "mergegate_requests_total", endpoint=CHAT, cohort="default", model="up") == 3
    assert sample_sum(scrape(second), "mergegate_requests_total") == 1  # the other gateway's count is its own
    before = buckets(text, "mergegate_request_duration_seconds", endpoint=CHAT, cohort="default")
    assert before[math.inf] == 3 and all(count <= 3 for count in before.values())
    assert sample_sum(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="up") == 3

    stub.set("primary", delay=0.7)  # this request takes at least 0.7 s: above the 0.64 s bucket
    ask(first)
    after = buckets(scrape(first), "mergegate_request_duration_seconds", endpoint=CHAT, cohort="default")
    assert after[math.inf] == 4 and after[0.64] == before[0.64]


@pytest.mark.slow
def test_streams_record_time_to_first_chunk_and_mirrored_calls_their_duration(stub, launch_each):
    gw = launch_each(stub_plan(stub))
    ask(gw, stream=True)
    ask(gw)
    wait_for(lambda: sample_sum(scrape(gw), "mergegate_mirror_total", outcome="recorded") == 2, timeout=30)
    text = scrape(gw)
    first_chunk = "gen_ai_client_operation_time_to_first_chunk_seconds_count"
    assert sample_sum(text, first_chunk, gen_ai_request_model="up", mergegate_cohort="default") == 1  # streams only
    assert sample_sum(text, "mergegate_mirror_duration_seconds_count", cohort="default", model="cand") == 2
    assert buckets(text, "mergegate_mirror_duration_seconds", cohort="default", model="cand")[math.inf] == 2
