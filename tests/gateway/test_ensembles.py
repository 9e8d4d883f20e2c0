"""Ensembles at the gateway (ensembles.py): hedge, race, vote and cascade over stub upstreams on 127.0.0.1 — which
answer wins, what the strategy cost (metrics and the request's span), a member down, and a vote that beats each
of its members on a crafted suite when evaluated through the endpoint runner like any candidate."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import yaml

from mergegate.gateway import GatewayConfig
from mergegate.rollout import RolloutPlan, load_plan

from .helpers import MESSAGES, route_of, sample_sum, samples, wait_for

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]

CONFIG = GatewayConfig(backend_timeout=5.0, breaker_failures=1000, max_tokens_limit=64)
MEMBERS = ("a", "b", "c")


def plan(stub) -> dict:
    return {
        "candidate": "a",
        "models": {name: {"url": stub.url, "upstream_model": name} for name in (*MEMBERS, "d")},
        "routes": {
            "hedged": {"model": "a", "fallback": ["b"], "strategy": {"kind": "hedge", "delay_ms": 300}},
            # a delay no answer on a busy machine outlasts: the next model is asked only when none came in time
            "patient": {"model": "a", "fallback": ["b"], "strategy": {"kind": "hedge", "delay_ms": 60_000}},
            "raced": {"model": "a", "strategy": {"kind": "race", "models": list(MEMBERS)}},
            "voted": {"model": "a", "check": "json_valid", "strategy": {"kind": "vote", "models": list(MEMBERS)}},
            "text_vote": {"model": "a", "strategy": {"kind": "vote", "models": ["a", "b"]}},
            "voted_fallback": {"model": "a", "fallback": ["b", "c"], "check": "json_valid",
                               "strategy": {"kind": "vote"}},
            "sampled": {"model": "a", "strategy": {"kind": "vote", "k": 3}},  # three samples of a
            "cascaded": {"model": "a", "fallback": ["d"], "check": "json_valid",
                         "strategy": {"kind": "cascade", "models": ["a", "b"]}},
            "plain": {"model": "a", "fallback": ["b"]},
        },
        "default": {"model": "a"},
    }


@pytest.fixture(scope="module")
def gw(stub, launch):
    return launch(plan(stub), config=CONFIG)


def ask(gw, cohort: str, content: str = MESSAGES[0]["content"]):
    response = gw.client().chat.completions.with_raw_response.create(
        model=f"cohort/{cohort}", messages=[{"role": "user", "content": content}], max_tokens=32)
    return response, response.parse()


def request_span(gw, response) -> dict:
    request_id = response.headers["x-request-id"]
    return wait_for(lambda: next((s for s in gw.spans() if s["kind"] == "SERVER"
                                  and s["attributes"].get("mergegate.request_id") == request_id), None))


def client_spans(gw, response) -> list[dict]:
    """The backend calls made for one request (the CLIENT spans under its SERVER span)."""
    parent = request_span(gw, response)["span_id"]
    return [s for s in gw.spans() if s["kind"] == "CLIENT" and s["parent_span_id"] == parent]


def counter(gw, name: str, **labels: str) -> float:
    return sample_sum(gw.metrics(), name, **labels)


# -- schema ---------------------------------------------------------------------------------------------------------

def test_plan_with_strategies_loads_and_plans_without_keep_their_yaml(stub, tmp_path):
    with_strategy = RolloutPlan.model_validate(plan(stub))
    path = with_strategy.save(tmp_path / "ensembles.yaml")
    loaded = load_plan(path)
    assert loaded.routes["voted"].strategy.kind == "vote" and loaded.routes["voted"].strategy_models() == list(MEMBERS)
    assert loaded.routes["hedged"].strategy_models() == ["a", "b"]  # default: the model, then its fallback
    assert yaml.safe_load(path.read_text())["routes"]["raced"]["strategy"] == {"kind": "race",
                                                                              "models": list(MEMBERS)}
    plain = {**plan(stub), "routes": {"plain": plan(stub)["routes"]["plain"]}}
    text = RolloutPlan.model_validate(plain).save(tmp_path / "plain.yaml").read_text()
    assert "strategy" not in text and yaml.safe_load(text)["routes"] == {"plain": {"model": "a", "fallback": ["b"],
                                                                                  "mirror": 0.0}}
    bad = {**plan(stub), "routes": {"x": {"model": "a", "strategy": {"kind": "vote", "models": ["a", "zz"]}}}}
    with pytest.raises(ValueError, match="route 'x' names model 'zz'"):
        RolloutPlan.model_validate(bad)
    misplaced = {**plan(stub), "routes": {"x": {"model": "a", "strategy": {"kind": "race", "k": 3}}}}
    with pytest.raises(ValueError, match="'k' applies to a vote, not to a race"):
        RolloutPlan.model_validate(misplaced)


# -- race and hedge -------------------------------------------------------------------------------------------------

def test_race_the_fast_model_wins_and_the_slow_ones_are_cancelled(gw, stub):
    stub.set("a", mode="hang")  # 30 s: the race must not wait for it
    stub.set("b", reply="fast b")
    stub.set("c", mode="hang")
    started = time.monotonic()
    response, answer = ask(gw, "raced")
    assert time.monotonic() - started < 20
    assert (answer.model, answer.choices[0].message.content) == ("b", "fast b")
    assert (route_of(response.headers)["model"], route_of(response.headers)["strategy"]) == ("b", "race")
    wait_for(lambda: stub.hung_up["a"] == 1 and stub.hung_up["c"] == 1)  # the cancel reached the upstream
    attributes = request_span(gw, response)["attributes"]
    assert attributes["mergegate.strategy"] == "race" and attributes["mergegate.strategy.winner"] == "b"
    assert attributes["mergegate.strategy.calls"] == 3 and attributes["mergegate.strategy.extra_calls"] == 2
    assert attributes["mergegate.strategy.cancelled"] == 2
    assert dict(zip(attributes["mergegate.strategy.models"], attributes["mergegate.strategy.outcomes"])) == \
        {"a": "cancelled", "b": "won", "c": "cancelled"}
    assert counter(gw, "mergegate_strategy_calls_total", cohort="raced", strategy="race", model="a",
                   outcome="cancelled") >= 1


def test_hedge_asks_the_next_model_only_after_the_delay(gw, stub):
    stub.set("a", reply="primary")
    _, answer = ask(gw, "patient")
    assert answer.model == "a" and stub.calls["b"] == 0  # answered within the delay: no extra call

    stub.set("a", mode="hang")  # 30 s
    stub.set("b", reply="hedged")
    started = time.monotonic()
    response, answer = ask(gw, "hedged")
    took = time.monotonic() - started
    assert (answer.model, answer.choices[0].message.content) == ("b", "hedged")
    assert 0.3 <= took < 20  # b was asked after 300 ms, and a was not waited for
    wait_for(lambda: stub.hung_up["a"] == 1)
    attributes = request_span(gw, response)["attributes"]
    assert attributes["mergegate.strategy.extra_calls"] == 1 and attributes["mergegate.strategy.cancelled"] == 1


# -- cascade --------------------------------------------------------------------------------------------------------

def test_cascade_escalates_when_the_small_models_check_fails(gw, stub):
    stub.set("a", reply='{"small": true}')
    _, answer = ask(gw, "cascaded")
    assert answer.model == "a" and stub.calls["b"] == 0

    stub.set("a", reply="not json at all")
    stub.set("b", reply='{"big": true}')
    response, answer = ask(gw, "cascaded")
    assert (answer.model, answer.choices[0].message.content) == ("b", '{"big": true}')
    assert route_of(response.headers)["skipped"] == "a:check:json_valid"
    attributes = request_span(gw, response)["attributes"]
    assert attributes["mergegate.strategy.outcomes"] == ["rejected", "won"]
    assert attributes["mergegate.strategy.extra_output_tokens"] == 4  # "not json at all": 4 stub tokens
    assert counter(gw, "mergegate_strategy_extra_tokens_total", cohort="cascaded", strategy="cascade",
                   type="output") == 4

    stub.set("b", reply="still not json")
    stub.set("d", reply='{"fallback": true}')
    response, answer = ask(gw, "cascaded")
    assert answer.model == "d"  # the strategy found no good answer: the route's own fallback answers
    assert route_of(response.headers)["fallback"] == "true"
    assert {call["attributes"]["gen_ai.request.model"]: call["attributes"]["mergegate.fallback"]
            for call in client_spans(gw, response)} == {"a": False, "b": False, "d": True}


# -- vote -----------------------------------------------------------------------------------------------------------

def test_vote_picks_the_majority_by_canonical_json_and_ties_go_to_model_order(gw, stub):
    stub.set("a", reply='{"x": 2}')
    stub.set("b", reply='{"x":1}')
    stub.set("c", reply='{ "x" : 1 }')  # the same object as b's, spelt differently
    response, answer = ask(gw, "voted")
    assert (answer.model, answer.choices[0].message.content) == ("b", '{"x":1}')
    assert route_of(response.headers)["fallback"] == "false"  # the vote's winner, not a fallback
    attributes = request_span(gw, response)["attributes"]
    assert attributes["mergegate.strategy.votes"] == 2 and attributes["mergegate.strategy.winner"] == "b"
    assert {call["attributes"]["mergegate.fallback"] for call in client_spans(gw, response)} == {False}

    response, answer = ask(gw, "voted_fallback")  # the same vote over the route's model and its fallback list
    assert answer.model == "b" and route_of(response.headers)["fallback"] == "false"

    stub.set("a", reply="yes")
    stub.set("b", reply="no")
    _, answer = ask(gw, "text_vote")
    assert answer.choices[0].message.content == "yes"  # one vote each: the earlier model's answer


def test_a_vote_over_one_model_takes_k_samples(gw, stub):
    stub.set("a", reply="sampled")
    response, answer = ask(gw, "sampled")
    assert answer.choices[0].message.content == "sampled" and stub.calls["a"] >= 2
    attributes = request_span(gw, response)["attributes"]
    assert attributes["mergegate.strategy.calls"] == 3 and attributes["mergegate.strategy.votes"] >= 2


def test_a_member_down_still_answers(gw, stub):
    stub.set("b", mode="fail")
    stub.set("a", reply='{"x": 1}')
    stub.set("c", reply='{"x": 1}')
    for cohort in ("raced", "voted", "hedged"):
        response, answer = ask(gw, cohort)
        assert answer.model in ("a", "c"), cohort
    stub.set("a", mode="fail")
    stub.set("b", mode="ok", reply="b answers")
    response, answer = ask(gw, "hedged")
    assert answer.model == "b" and route_of(response.headers)["skipped"] == "a:http_error"
    assert counter(gw, "mergegate_fallbacks_total", cohort="hedged", model="a", reason="http_error") == 1


def test_a_stream_on_a_strategy_route_gets_the_chosen_answer(gw, stub):
    stub.set("a", mode="hang")
    stub.set("b", reply="streamed winner")
    stub.set("c", mode="hang")
    chunks = list(gw.client().chat.completions.create(model="cohort/raced", messages=MESSAGES, max_tokens=32,
                                                      stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed winner"
    assert {c.model for c in chunks} == {"b"}
    wait_for(lambda: stub.hung_up["a"] == 1 and stub.hung_up["c"] == 1)  # the losers were cancelled upstream


def test_a_burst_with_a_member_down_and_one_slow_is_answered_and_counted(stub, launch_each):
    """Every call a strategy makes is counted exactly once, under the one outcome it had: which outcome a losing
    call gets (cancelled, or answered when its answer came before it could be cancelled) is the machine's timing,
    not the product's promise."""
    gw = launch_each(plan(stub), config=GatewayConfig(backend_timeout=5.0, breaker_failures=3, breaker_cooldown=60))
    stub.set("a", reply='{"x": 1}')
    stub.set("b", mode="fail")
    stub.set("c", reply='{"x":1}', delay=1.0)
    per_route = 24

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=2 * per_route)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json={
                "model": f"cohort/{cohort}", "messages": MESSAGES, "max_tokens": 8})
                for cohort in ("raced", "voted") for _ in range(per_route)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * (2 * per_route)
    assert {r.json()["model"] for r in responses[per_route:]} == {"a"}  # the vote: a and c agree, a is earlier
    assert {r.json()["model"] for r in responses[:per_route]} <= {"a", "c"}  # the race: the first good answer
    for cohort, kind in (("raced", "race"), ("voted", "vote")):
        calls = outcomes(gw, cohort, kind)
        assert counter(gw, "mergegate_strategy_requests_total", cohort=cohort, strategy=kind) == per_route
        assert calls.get(("a", "won"), 0) + calls.get(("c", "won"), 0) == per_route  # one winner a request
        for model in ("a", "c"):  # asked by every request, once each
            assert sum(n for (m, _), n in calls.items() if m == model) == per_route, (cohort, model, calls)
        # b is down: each request either called it (failed) or skipped it with its breaker open (no call made)
        skipped_b = counter(gw, "mergegate_fallbacks_total", cohort=cohort, model="b", reason="circuit_open")
        # (the breaker is b's, not a route's: the other route's failures may open it before this one calls b)
        assert {o for (m, o) in calls if m == "b"} <= {"failed"}
        assert calls.get(("b", "failed"), 0) + skipped_b == per_route, (cohort, calls, skipped_b)
    raced, voted = outcomes(gw, "raced", "race"), outcomes(gw, "voted", "vote")
    assert {o for (m, o) in raced} <= {"won", "answered", "cancelled", "failed"}
    assert voted[("a", "won")] == per_route and voted[("c", "answered")] == per_route
    cancelled = raced.get(("a", "cancelled"), 0) + raced.get(("c", "cancelled"), 0)
    if cancelled:  # a cancelled call's upstream request is dropped too (never more than were cancelled)
        wait_for(lambda: stub.hung_up["a"] + stub.hung_up["c"] >= 1)
    assert stub.hung_up["a"] + stub.hung_up["c"] <= cancelled
    assert gw.gateway.breakers["a"].snapshot()["state"] == "closed"
    assert gw.gateway.breakers["c"].snapshot()["state"] == "closed"
    assert gw.gateway.breakers["b"].snapshot()["state"] == "open"  # the member down is skipped, not waited for


def outcomes(gw, cohort: str, kind: str) -> dict[tuple[str, str], float]:
    """mergegate_strategy_calls_total for one route: (model, outcome) → calls."""
    return {(labels["model"], labels["outcome"]): value
            for labels, value in samples(gw.metrics(), "mergegate_strategy_calls_total", cohort=cohort, strategy=kind)}


def test_a_route_without_a_strategy_makes_one_call_and_records_no_strategy_cost(gw, stub):
    before = counter(gw, "mergegate_strategy_requests_total")
    _, answer = ask(gw, "plain")
    assert answer.model == "a" and sum(stub.calls.values()) == 1
    assert counter(gw, "mergegate_strategy_requests_total") == before


# -- the done-when: a vote that beats each member, evaluated as a candidate ---------------------------------------

def test_vote_beats_each_member_through_the_endpoint_runner(gw, stub, tmp_path):
    from mergegate.evaluate import EvalOptions, evaluate_models
    from mergegate.evaluate.suite import load_suite
    from mergegate.model_ref import EndpointSettings, ModelRef
    from mergegate.registry import Registry

    rows, spellings = [], {"a": '{{"answer": {}}}', "b": '{{"answer":{}}}', "c": '{{ "answer" : {} }}'}
    replies: dict[str, dict[str, str]] = {name: {} for name in MEMBERS}
    for i in range(24):
        question = f"question {i}: answer in JSON"
        rows.append({"id": f"q{i}", "cohort": "voted", "messages": [{"role": "user", "content": question}],
                     "expected": json.dumps({"answer": i}), "evaluators": ["json_schema"],
                     "schema": {"type": "object", "properties": {"answer": {"const": i}}, "required": ["answer"]}})
        wrong = MEMBERS[i // 8]  # each member is wrong on its own third of the rows
        for name in MEMBERS:
            replies[name][question] = spellings[name].format(-1 if name == wrong else i)
    for name in MEMBERS:
        stub.set(name, replies=replies[name])
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    refs = [(ModelRef(name, url=stub.url, served_model=name), "source") for name in MEMBERS]
    vote = ModelRef("vote", url=gw.url + "/v1", served_model="cohort/voted")
    runs = evaluate_models([*refs, (vote, "candidate")], load_suite(path), Registry(tmp_path / "r.sqlite"),
                           EvalOptions(max_new_tokens=16, progress=False, endpoint=EndpointSettings(concurrency=3, timeout_s=10, retries=0)))
    score = {name: sum(r.score for r in run.results) / len(run.results) for name, run in runs.items()}
    assert score["vote"] == 1.0
    assert all(score[name] == pytest.approx(16 / 24) for name in MEMBERS)
    assert counter(gw, "mergegate_strategy_requests_total", cohort="voted", strategy="vote") >= 24

    # the gate releases the vote like any candidate: `mergegate gate --candidate NAME=URL#cohort/ROUTE`
    from typer.testing import CliRunner

    from mergegate.cli.main import app

    gated = CliRunner().invoke(app, ["gate", "--candidate", str(vote), "--base", str(refs[0][0]),
                                     "--source", str(refs[1][0]), "--source", str(refs[2][0]), "--suite", str(path),
                                     "--out", str(tmp_path / "out"), "--registry", str(tmp_path / "r.sqlite"),
                                     "--max-new-tokens", "16", "--endpoint-retries", "0"])
    assert gated.exit_code == 0, gated.output
    released = load_plan(tmp_path / "out" / "rollout.yaml")
    assert released.candidate == "vote" and released.models["vote"].upstream_model == "cohort/voted"
    assert (released.routes["voted"].model, released.routes["voted"].decision) == ("vote", "promote")
