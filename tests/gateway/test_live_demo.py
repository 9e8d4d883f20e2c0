"""The live loop end to end on the demo: the gateway serves the demo's rollout plan over the shipped tiny models,
the candidate a real merge of the specialists (examples/demo/recipes/ties.yaml, merged once here) served by its own
server on 127.0.0.1 as vLLM would serve it, with the demo policy and a live block. A bounded load generator on
loopback replays the suite's prompts as chat requests, one at a time, each scored before the next is sent.

The scenario runs once (the module's fixture); each test checks one promise on what it recorded:
- a cohort the offline gate held is decided from live evidence, as the candidate's real answers deserve;
- a candidate swapped (its server switched to another build) for one that breaks that cohort after its promotion
  is rolled back within `ROLLBACK_PAIRS` rows, after which no request of the cohort reaches it, and no request
  sent is lost;
- a gateway restarted mid-experiment on the same registry resumes the evidence and the plan version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from mergegate import merge
from mergegate.gate import load_policy
from mergegate.gateway import GatewayConfig, create_app
from mergegate.gateway.checks import tool_named
from mergegate.gateway.testing import ServerThread
from mergegate.live import SequentialParams, family_decisions, start, update
from mergegate.registry import Registry
from mergegate.rollout import RolloutPlan

from .helpers import wait_for

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
MODELS = DEMO / "models"
pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow,
              pytest.mark.skipif(not (MODELS / "base" / "config.json").is_file(), reason="demo models not built")]

HELD = "tool_required"  # held by the demo's gate; its online check (a listed tool named) passes on both models
OTHER_HELD = "json_output"  # held too, with a few rows: the family the live test corrects over has two cohorts
TOKEN = "candidate-server-admin"
CONFIG = GatewayConfig(backend_timeout=60.0, mirror_timeout=60.0)
# A candidate that loses every pair is rolled back when the rollback bet's e-value at the margin reaches e-Holm's
# first step, 2/α = 80 with the demo's two held cohorts under test (α = (1 − 0.95)/2 = 0.025 per side): each lost
# pair multiplies the wealth by at most 1 + CAP = 1.75, so never before ⌈ln 80 / ln 1.75⌉ = 8 pairs, and the
# bet's cautious first stakes make it 11 (9 with one cohort under test). Checked against the sequential test below.
ROLLBACK_PAIRS = 11
# The broken build: the tool specialist's task vector subtracted four times (a task-negation merge gone too far):
# it names none of the listed tools on the suite's tool prompts, so each answer fails the route's check.
BROKEN_RECIPE = {"merge_method": "task_arithmetic", "base_model": str(MODELS / "base"),
                 "models": [{"model": str(MODELS / "tool_required"), "parameters": {"weight": -4.0}}],
                 "parameters": {"lambda": 1.0}, "dtype": "float32"}


def suite_rows() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["cohort"], []).append(row)
    return rows


def demo_policy():
    """The demo's policy, with a live block: half of a canary's requests go to the candidate."""
    data = yaml.safe_load((DEMO / "policy.yaml").read_text())
    return load_policy({**data, "live": {"canary_share": 0.5}})


def demo_plan(candidate_url: str, tools: list[str]) -> dict:
    """The plan `mergegate demo` writes for its ties release (its routes, fallback chains and decisions: arithmetic
    rejected, tool_required and json_output held, policy_refusal and out_of_domain promoted), the held cohorts
    mirrored in full, and the candidate behind its own server."""
    def local(name: str) -> dict:
        return {"role": "base" if name == "base" else "source", "path": str(MODELS / name)}

    models = {"merged-ties": {"role": "candidate", "url": candidate_url, "upstream_model": "mergegate"},
              **{name: local(name) for name in ("base", "tool_required", "json_output", "policy_refusal")},
              "arithmetic_lora": {"path": str(MODELS / "base"), "adapter": str(MODELS / "arithmetic_lora")}}
    promoted = {"model": "merged-ties", "fallback": ["base", "tool_required", "policy_refusal", "json_output",
                                                     "arithmetic_lora"]}
    routes = {
        "arithmetic": {"model": "arithmetic_lora", "fallback": ["base", "tool_required", "policy_refusal",
                                                                "json_output"], "decision": "reject"},
        HELD: {"model": "tool_required", "fallback": ["json_output", "policy_refusal", "base", "arithmetic_lora"],
               "mirror": 1.0, "decision": "hold", "check": "tool_selection", "tools": tools},
        OTHER_HELD: {"model": "json_output", "fallback": ["policy_refusal", "base", "tool_required", "arithmetic_lora"],
                     "mirror": 1.0, "decision": "hold", "check": "json_valid"},
        "policy_refusal": {**promoted, "decision": "promote", "check": "refusal"},
        "out_of_domain": {**promoted, "decision": "promote"}}
    return {"candidate": "merged-ties", "models": models, "routes": routes, "default": promoted}


@dataclass
class Replay:
    """The load generator: suite rows sent one at a time as chat requests with the cohort's X-Cohort header, each
    answer's live events scored before the next request (so a phase change is seen before anything else is sent).
    Every request and its status is kept."""

    client: httpx.Client
    sent: list[dict] = field(default_factory=list)

    def send(self, gw, row: dict) -> dict:
        response = self.client.post(gw.url + "/v1/chat/completions", headers={"X-Cohort": row["cohort"]}, json={
            "model": "mergegate", "messages": [{"role": "user", "content": row["prompt"]}], "temperature": 0,
            "max_tokens": len(row["expected"]) + 16})
        record = {"row": row, "status": response.status_code, "id": response.headers.get("x-request-id"),
                  "route": response.headers.get("x-mergegate-route")}
        self.sent.append(record)
        wait_for(lambda: gw.gateway.mirror.in_flight == 0 and gw.gateway.live.idle, timeout=120)
        return record

    def until(self, gw, rows: list[dict], done, limit: int) -> int:
        """Send `rows` in turn (cycling) until `done()`; how many it took. More than `limit` fails (never: "forever")."""
        for sent in range(1, limit + 1):
            self.send(gw, rows[(sent - 1) % len(rows)])
            if done():
                return sent
        raise AssertionError(f"not done within {limit} requests: {gw.gateway.live.cohorts[HELD]}")


def phase(gw, cohort: str = HELD) -> str:
    return gw.gateway.live.cohorts[cohort].phase


def steps(gw) -> list[dict]:
    return gw.registry.live_steps(gw.gateway.live.experiment)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, launch):
    """The whole experiment, once: its gateways, the load generator's record and what was seen along the way."""
    folder = tmp_path_factory.mktemp("live-demo")
    merge(DEMO / "recipes" / "ties.yaml", folder / "ties", progress=False)
    merge(BROKEN_RECIPE, folder / "broken", progress=False)
    rows = suite_rows()
    tools = sorted({tool for row in rows[HELD] for tool in row["tools"]})
    # the candidate's server: the merge as build "a"; switching its route to build "b" is the swap
    builds = RolloutPlan.model_validate({"candidate": "a", "models": {
        "a": {"role": "candidate", "path": str(folder / "ties")}, "b": {"path": str(folder / "broken")}},
        "routes": {}, "default": {"model": "a"}})
    candidate_server = ServerThread(create_app(builds, registry=Registry(folder / "candidate.sqlite"),
                                               admin_token=TOKEN, config=CONFIG)).start()
    seen: dict = {}
    with httpx.Client(timeout=120) as client:
        replay = Replay(client)
        plan = demo_plan(candidate_server.url + "/v1", tools)
        first = launch(plan, config=CONFIG, policy=demo_policy())
        seen["start"] = {c: s.phase for c, s in first.gateway.live.cohorts.items()}
        for cohort_rows in rows.values():  # every cohort, as traffic comes
            for row in cohort_rows[:2]:
                replay.send(first, row)
        shadow_sent = replay.until(first, rows[HELD][2:], lambda: phase(first) != "shadow", limit=200)
        seen["promoted"] = {"step": steps(first)[-1], "shadow_sent": shadow_sent,
                            "mirrors": [m for m in first.registry.mirror_results() if m["cohort"] == HELD]}
        # restart mid-experiment: a new gateway on the same registry and plan
        live = first.gateway.live
        seen["before_restart"] = {"version": live.version, "experiment": live.experiment,
                                  "states": {c: s.to_json() for c, s in live.cohorts.items()},
                                  "plan": first.gateway.plan}
        first.server.stop()
        second = launch(plan, config=CONFIG, policy=demo_policy(), registry_path=first.registry.path)
        live = second.gateway.live
        seen["after_restart"] = {"version": live.version, "experiment": live.experiment,
                                 "states": {c: s.to_json() for c, s in live.cohorts.items()},
                                 "plan": second.gateway.plan}
        # the swap: the candidate's server now answers with the broken build
        swapped = client.post(candidate_server.url + "/admin/routes/default", headers={
            "Authorization": f"Bearer {TOKEN}"}, json={"model": "b", "reason": "another build deployed"})
        assert swapped.status_code == 200, swapped.text
        seen["swapped_at"] = len(replay.sent)
        canary_sent = replay.until(second, rows[HELD][40:], lambda: phase(second) != "canary", limit=150)
        seen["rolled_back"] = {"step": steps(second)[-1], "canary_sent": canary_sent}
        for row in rows[HELD][:5]:  # after the rollback: the cohort's source answers
            replay.send(second, row)
        seen["registry"] = second.registry
        seen["experiment"] = second.gateway.live.experiment
    yield {"replay": replay, "seen": seen, "first": first, "second": second}
    candidate_server.stop()


def test_a_held_cohort_is_decided_from_live_evidence_as_the_candidates_answers_deserve(scenario):
    seen = scenario["seen"]
    assert seen["start"][HELD] == seen["start"][OTHER_HELD] == "shadow"
    assert seen["start"]["arithmetic"] == "off" and seen["start"]["policy_refusal"] == "done"
    step = seen["promoted"]["step"]
    assert (step["version"], step["phase_before"], step["phase_after"], step["action"], step["actor"]) == (
        1, "shadow", "canary", "promote", "gateway")
    decision = json.loads(step["evidence"])["decision"]
    assert json.loads(step["evidence"])["sources"] == ["tool_selection"]
    # what the candidate deserved: each mirrored pair's answers checked again here, by the same online check
    # (the route's tools, none expected) and by the suite's reference (the expected tool)
    by_id = {r["id"]: r["row"] for r in scenario["replay"].sent}
    pairs = [(m["mirror_output"], m["primary_output"], by_id[m["request_id"]]) for m in seen["promoted"]["mirrors"]]
    assert len(pairs) == decision["rows"] and all(m["mirror_model"] == "merged-ties"
                                                  for m in seen["promoted"]["mirrors"])
    online = [tool_named(c, row["tools"])[0] - tool_named(s, row["tools"])[0] for c, s, row in pairs]
    assert sum(online) / len(online) >= -0.1  # non-inferior within the demo's max_drop on the check the loop uses
    assert decision["outcome"] == "promote" and decision["diff_low"] >= -0.1
    assert decision["diff_low"] <= sum(online) / len(online) <= decision["diff_high"]
    assert decision["promote_e"] >= decision["promote_threshold"] == 80  # e-Holm's first step over two cohorts


def test_the_rollback_bound_is_what_the_sequential_test_gives_for_a_candidate_losing_every_pair():
    params = SequentialParams.from_policy(demo_policy(), HELD)  # the demo's max_drop 0.1, confidence 0.95
    family = {HELD: start(params), OTHER_HELD: start(params)}
    while family_decisions(family, dict.fromkeys(family, params))[HELD].outcome != "rollback":
        family[HELD] = update(family[HELD], 0.0, 1.0)  # the candidate fails, the source passes
        assert family[HELD].rows <= 100
    assert family[HELD].rows == ROLLBACK_PAIRS


def test_a_swapped_candidate_that_breaks_the_cohort_is_rolled_back_and_answers_none_of_it_after(scenario):
    seen, replay = scenario["seen"], scenario["replay"]
    step = seen["rolled_back"]["step"]
    assert (step["phase_before"], step["phase_after"]) == ("canary", "rolled_back")
    decision = json.loads(step["evidence"])["decision"]
    if step["action"] == "rollback":  # the sequential test concluded first
        assert decision["rows"] <= ROLLBACK_PAIRS and decision["diff_high"] <= -0.1
    else:  # or the fallback guardrail, at the policy's 20th of the candidate's requests, whichever came first
        assert step["action"] == "guardrail" and "fallback rate" in step["reason"]
        assert decision is None or decision["rows"] < ROLLBACK_PAIRS
    # after the rollback's plan version, no request of the cohort reached the candidate
    registry, experiment = seen["registry"], seen["experiment"]
    requests = registry.live_requests(experiment)
    after = [r for r in requests if r["cohort"] == HELD and r["plan_version"] >= step["version"]]
    assert len(after) >= 5 and {r["model"] for r in after} == {"tool_required"}
    assert all("merged-ties" not in r["route"] for r in replay.sent[-5:])
    # before it, the candidate's arm was answered by the source each time the broken build failed the check
    canary = [r for r in requests if r["cohort"] == HELD and r["phase"] == "canary"]
    assert {r["model"] for r in canary} == {"tool_required"}
    # no request lost: every request sent was answered, and each was recorded with its plan version
    assert [r["status"] for r in replay.sent] == [200] * len(replay.sent)
    assert sorted(r["request_id"] for r in requests) == sorted(r["id"] for r in replay.sent)


def test_a_restart_mid_experiment_resumes_the_evidence_and_the_plan_version(scenario):
    before, after = scenario["seen"]["before_restart"], scenario["seen"]["after_restart"]
    assert after["experiment"] == before["experiment"] and after["version"] == before["version"] == 1
    assert after["states"] == before["states"]  # phases, stages and evidence (json_output's shadow rows included)
    assert json.loads(after["states"][OTHER_HELD])["evidence"] is not None
    assert after["plan"] == before["plan"]  # the canary's route, not the file's shadow route
    assert after["plan"].routes[HELD].canary == 0.5
