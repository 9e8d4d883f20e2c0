"""The live loop's parts without a gateway: `POST /v1/feedback` body parsing (property tests), online scores, the
pairwise judge against a loopback stub, the registry's live tables and their migration, the policy's live block."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergegate.errors import PolicyError
from mergegate.gate import load_policy
from mergegate.gateway.errors import APIError
from mergegate.gateway.live import parse_feedback, route_for
from mergegate.gateway.online_scores import PAIRWISE_PROMPT, PairwiseJudge, parse_preference, scorer_for
from mergegate.gateway.testing import ServerThread, StubUpstream
from mergegate.registry import SCHEMA_VERSION, Registry
from mergegate.rollout import Route

# -- POST /v1/feedback bodies ------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)
IDS = st.text(min_size=1, max_size=256).filter(lambda s: "\x00" not in s)
METRICS = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(request_id=IDS, metric=METRICS, value=st.booleans() | st.floats(0, 1) | st.integers(0, 1))
def test_every_well_formed_feedback_parses_to_what_was_sent(request_id, metric, value):
    raw = json.dumps({"request_id": request_id, "metric": metric, "value": value}).encode()
    body = parse_feedback(raw)
    assert (body.request_id, body.metric, body.value) == (request_id, metric, value)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_any_other_body_is_a_400_naming_the_problem_never_another_error(body):
    try:
        parsed = parse_feedback(body)
    except APIError as err:
        assert err.status in (400, 413) and err.body()["error"]["message"]
    else:  # it happened to be a well-formed body
        assert isinstance(parsed.value, bool) or 0 <= parsed.value <= 1


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", None, [1]])
def test_a_value_outside_0_1_or_not_a_number_is_refused_by_name(value):
    with pytest.raises(APIError) as caught:
        parse_feedback(json.dumps({"request_id": "r", "metric": "m", "value": value}).encode())
    assert caught.value.status == 400 and caught.value.body()["error"]["param"] == "value"


def test_nan_is_refused_as_not_a_number():
    with pytest.raises(APIError) as caught:
        parse_feedback(b'{"request_id": "r", "metric": "m", "value": NaN}')
    assert caught.value.status == 400


@pytest.mark.parametrize("body, param", [({"metric": "m", "value": 1}, "request_id"),
                                         ({"request_id": "r", "metric": "has space", "value": 1}, "metric"),
                                         ({"request_id": "r", "metric": "m", "value": 1, "x": 1}, "x")])
def test_a_missing_or_bad_field_is_named(body, param):
    with pytest.raises(APIError) as caught:
        parse_feedback(json.dumps(body).encode())
    assert caught.value.body()["error"]["param"] == param


# -- online scores ------------------------------------------------------------------------------------------------

def test_each_source_scores_and_the_lowest_counts():
    live = load_policy({"live": {"must_refuse": [], "max_answer_chars": 12, "max_latency_ms": 100}}).live
    json_route = Route(model="m", check="json_valid")
    scorer = scorer_for("c", json_route, live)
    assert scorer.score('{"a": 1}', 50) == (1.0, {"json_valid": 1.0, "length": 1.0, "latency": 1.0})
    assert scorer.score('{"a": 1}', 500)[0] == 0.0
    assert scorer.score("not json", 5)[0] == 0.0
    tools = scorer_for("c", Route(model="m", check="tool_selection", tools=["search", "music"]), live)
    assert tools.score("search", 1)[1]["tool_selection"] == 1.0
    refusing = scorer_for("r", Route(model="m"), load_policy({"live": {"must_refuse": ["r"]}}).live)
    assert refusing.score("I can't help with that.", None) == (1.0, {"refusal": 1.0})
    assert scorer_for("c", Route(model="m"), load_policy({}).live).score("anything", 1) == (None, {})


def test_a_policy_naming_an_unknown_must_refuse_cohort_is_refused():
    with pytest.raises(PolicyError, match="must_refuse"):
        load_policy({"live": {"must_refuse": ["typo"]}}).check_cohorts(["a", "b"])


def test_the_default_live_block_leaves_the_policy_hash_as_before():
    # the hash of the default policy before the live block existed
    assert load_policy(None).sha256 == "6d186801567d6e61de2d774b1a0928e95bf8ee2c80363a7d9b7fa725b60ba5d7"
    assert load_policy({"live": {"canary_share": 0.5}}).sha256 != load_policy(None).sha256


def test_routes_per_phase_keep_the_source_as_fallback_and_roll_back_to_it():
    origin = Route(model="src", fallback=["base"], mirror=0.2)
    full = route_for("full", origin, "cand", 0.1)
    assert (full.model, full.fallback, full.mirror, full.mirror_to) == ("cand", ["src", "base"], 0.2, "src")
    assert route_for("canary", origin, "cand", 0.1).canary == 0.1
    back = route_for("rolled_back", origin, "cand", 0.1)
    assert (back.model, back.fallback, back.mirror, back.decision) == ("src", ["base"], 0.0, "reject")
    promoted = Route(model="cand", fallback=["src", "base"])  # the gate promoted it: roll back to its first source
    assert route_for("rolled_back", promoted, "cand", 0.1).model == "src"


# -- the pairwise judge ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge_stub():
    upstream = StubUpstream()
    with ServerThread(upstream.app) as server:
        upstream.url = server.url + "/v1"
        yield upstream


def _judge(stub) -> PairwiseJudge:
    return PairwiseJudge(load_policy({"live": {"judge": {"base_url": stub.url, "model": "judge"}}}).live.judge)


@pytest.mark.slow
def test_the_judge_is_asked_in_both_orders_so_a_position_bias_is_a_tie(judge_stub):
    judge_stub.set("judge", reply='{"better": "A", "reason": "first is best"}')
    assert _judge(judge_stub).preference("q", "cand answer", "served answer") == 0.5
    assert judge_stub.calls["judge"] == 2


@pytest.mark.slow
def test_a_judge_that_prefers_the_candidate_in_both_orders_gives_it_1(judge_stub):
    prompts = {PAIRWISE_PROMPT.format(prompt="q", a="good", b="bad"): '{"better": "A"}',
               PAIRWISE_PROMPT.format(prompt="q", a="bad", b="good"): '```json\n{"better": "B"}\n```'}
    judge_stub.set("judge", reply="no verdict", replies=prompts)
    assert _judge(judge_stub).preference("q", "good", "bad") == 1.0
    assert _judge(judge_stub).preference("q", "bad", "good") == 0.0
    assert _judge(judge_stub).preference("other", "good", "bad") == 0.5  # unusable verdicts: a tie


def test_preferences_are_read_leniently_and_anything_else_is_none():
    assert parse_preference('{"better": "tie"}') == "tie"
    assert parse_preference('Sure. {"better": "b", "reason": "x"}') == "B"
    assert parse_preference("A") is None and parse_preference('{"better": "C"}') is None


# -- the registry's live tables ------------------------------------------------------------------------------------

def test_a_version_3_registry_gains_the_live_tables_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    Registry(path).record_plan_change("c", "a", "b", "why")
    db = sqlite3.connect(path)
    with db:
        for table in ("live_steps", "live_state", "live_rows", "live_requests", "live_feedback", "live_drift"):
            db.execute(f"DROP TABLE {table}")
        db.execute("PRAGMA user_version=3")
    db.close()
    registry = Registry(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert [c["new_model"] for c in registry.plan_changes()] == ["b"]
    registry.record_live_step("e", 0, "*", {"phase_before": "-", "phase_after": "-", "action": "start",
                                            "actor": "gateway", "reason": "r", "evidence": {}, "plan_before": "x",
                                            "plan_after": "x", "plan": {}})
    registry.save_live_state("e", {"cohort:c": "{}"})
    registry.save_live_state("e", {"cohort:c": "{\"a\": 1}"})
    assert registry.live_experiments() == ["e"] and registry.live_state("e") == {"cohort:c": "{\"a\": 1}"}
    assert math.isclose(len(registry.live_steps("e")), 1)
