"""The live loop (gateway/live.py) on a real gateway over the stub upstream: shadow pairs and canary arms scored off
the request path, each cohort promoted phase by phase or rolled back by its sequential test, guardrails, admin
overrides, drift, and every step a plan version in the registry that a restart resumes."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from mergegate.cli import app
from mergegate.gate import load_policy
from mergegate.gateway import GatewayConfig
from mergegate.gateway.live import experiment_id, plan_digest
from mergegate.rollout import RolloutPlan

from .helpers import MESSAGES, sample_sum, wait_for

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]

FAST = GatewayConfig(backend_timeout=5.0, max_tokens_limit=64)
SHORT, LONG = "ok", "a long answer that breaks the length bound"
JSON_ANSWER = '{"ok": true}'
TOKEN = "secret-admin-token"


def plan(stub, **routes) -> dict:
    return {"candidate": "cand",
            "models": {"src": {"url": stub.url, "upstream_model": "primary"},
                       "cand": {"role": "candidate", "url": stub.url, "upstream_model": "candidate"}},
            "routes": {"held": {"model": "src", "mirror": 1.0}, "other": {"model": "src"}, **routes},
            "default": {"model": "src"}}


def policy(**live):
    # answers longer than 10 characters score 0: the stub's scripted replies make each side win or lose
    return load_policy({"default": {"max_drop": 0.1},
                        "live": {"canary_share": 0.5, "max_answer_chars": 10, "guardrail_min_requests": 1000,
                                 **live}})


def ask(gw, cohort: str = "held"):
    response = httpx.post(gw.url + "/v1/chat/completions", timeout=30, headers={"X-Cohort": cohort},
                          json={"model": "mergegate", "messages": MESSAGES, "max_tokens": 32})
    assert response.status_code == 200, response.text
    return response


def settle(gw) -> None:
    wait_for(lambda: gw.gateway.mirror.in_flight == 0 and gw.gateway.live.idle, timeout=60)


def phase(gw, cohort: str = "held") -> str:
    return gw.gateway.live.cohorts[cohort].phase


def drive(gw, until, limit: int = 200, cohort: str = "held") -> int:
    """Requests on `cohort`, each scored before the next, until `until()` holds; how many it took."""
    for sent in range(1, limit + 1):
        ask(gw, cohort)
        settle(gw)
        if until():
            return sent
    raise AssertionError(f"not reached within {limit} requests: {gw.gateway.live.cohorts[cohort]}")


def steps(gw) -> list[dict]:
    return gw.registry.live_steps(gw.gateway.live.experiment)


def test_a_better_candidate_goes_shadow_canary_full_done_each_step_a_recorded_plan_version(stub, launch_each):
    stub.set("primary", reply=LONG)
    stub.set("candidate", reply=SHORT)
    gw = launch_each(plan(stub), config=FAST, policy=policy())
    assert phase(gw) == "shadow" and phase(gw, "other") == "off"
    drive(gw, lambda: phase(gw) == "done")
    recorded = steps(gw)
    assert [(s["version"], s["phase_before"], s["phase_after"], s["action"]) for s in recorded] == [
        (0, "-", "-", "start"), (1, "shadow", "canary", "promote"), (2, "canary", "full", "promote"),
        (3, "full", "done", "promote")]
    for before, after in zip(recorded, recorded[1:]):
        assert after["plan_before"] == before["plan_after"] != after["plan_after"]
        evidence = json.loads(after["evidence"])
        assert evidence["sources"] == ["length"]
        decision = evidence["decision"]
        assert decision["outcome"] == "promote" and decision["diff_low"] >= -0.1 and decision["rows"] >= 1
        assert decision["promote_e"] >= decision["promote_threshold"]
    assert plan_digest(gw.gateway.plan) == recorded[-1]["plan_after"]
    held = gw.gateway.plan.routes["held"]
    assert (held.model, held.fallback, held.mirror, held.mirror_to, held.decision) == ("cand", ["src"], 0.0, None,
                                                                                      "promote")
    assert ask(gw).headers["x-mergegate-route"].count("model=cand") == 1
    # the canary's requests went to both arms, each recorded with the plan version it was routed by
    canary = [r for r in gw.registry.live_requests(gw.gateway.live.experiment) if r["phase"] == "canary"]
    assert {r["arm"] for r in canary} == {"candidate", "served"}
    assert all(r["model"] == ("cand" if r["arm"] == "candidate" else "src") for r in canary)
    assert sample_sum(gw.metrics(), "mergegate_live_plan_version") == 3
    # what a person reads: the terminal table and the page, from the registry
    shown = CliRunner().invoke(app, ["live", "status", str(gw.registry.path), "--plan", str(gw.plan_path)])
    assert shown.exit_code == 0, shown.output
    assert "held" in shown.output and "done" in shown.output and "plan version 3" in shown.output
    page = gw.plan_path.parent / "live.html"
    assert CliRunner().invoke(app, ["live", "page", str(gw.registry.path), str(page)]).exit_code == 0
    assert "Plan steps" in page.read_text() and "held:shadow" in page.read_text()


def test_a_worse_candidate_is_rolled_back_in_shadow_and_no_longer_mirrored(stub, launch_each):
    stub.set("primary", reply=SHORT)
    stub.set("candidate", reply=LONG)
    gw = launch_each(plan(stub), config=FAST, policy=policy())
    rows = drive(gw, lambda: phase(gw) == "rolled_back")
    assert rows <= 12  # every pair a loss: the rollback bet reaches 1/α within a dozen rows
    last = steps(gw)[-1]
    assert (last["phase_before"], last["phase_after"], last["action"]) == ("shadow", "rolled_back", "rollback")
    held = gw.gateway.plan.routes["held"]
    assert (held.model, held.mirror, held.decision) == ("src", 0.0, "reject")
    mirrored = stub.calls["candidate"]
    for _ in range(3):
        ask(gw)
    settle(gw)
    assert stub.calls["candidate"] == mirrored


def test_a_failing_candidate_in_its_canary_is_rolled_back_by_the_guardrail_at_once(stub, launch_each):
    stub.set("primary", reply=LONG)
    stub.set("candidate", reply=SHORT)
    gw = launch_each(plan(stub), config=FAST, policy=policy(guardrail_min_requests=4, max_error_rate=0.2))
    drive(gw, lambda: phase(gw) == "canary")
    stub.set("candidate", mode="fail")  # every call of the candidate fails: its requests fall back to the source
    drive(gw, lambda: phase(gw) == "rolled_back")
    last = steps(gw)[-1]
    assert (last["phase_before"], last["action"]) == ("canary", "guardrail")
    assert "error rate" in last["reason"]
    version = last["version"]
    for _ in range(5):
        assert "model=src" in ask(gw).headers["x-mergegate-route"]
    settle(gw)
    after = [r for r in gw.registry.live_requests(gw.gateway.live.experiment)
             if r["cohort"] == "held" and r["plan_version"] >= version]
    assert len(after) == 5 and {r["model"] for r in after} == {"src"}


@pytest.mark.parametrize("phase_under_test", ["canary", "full"])
def test_a_candidate_answer_that_fails_the_routes_check_counts_as_its_loss_though_the_source_answered(
        stub, launch_each, phase_under_test):
    """In a canary or full phase the candidate answers first and falls back to the source when its answer fails the
    route's check: that request's candidate score is the failed check's 0, not the source's answer standing in for
    it (a candidate whose every answer fell back would otherwise tie the source and be promoted)."""
    stub.set("primary", reply=JSON_ANSWER)
    stub.set("candidate", reply=JSON_ANSWER)
    checked = plan(stub, held={"model": "src", "mirror": 1.0, "check": "json_valid"})
    gw = launch_each(checked, config=FAST, policy=policy(max_answer_chars=None), admin_token=TOKEN)
    for _ in range(2 if phase_under_test == "full" else 1):
        httpx.post(gw.url + "/admin/live/held", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                   json={"action": "promote", "reason": "skip ahead to the phase under test"})
    assert phase(gw) == phase_under_test
    stub.set("candidate", reply="not json")  # fails json_valid: every request the candidate takes falls back
    drive(gw, lambda: phase(gw) != phase_under_test, limit=80)
    last = steps(gw)[-1]
    assert (last["phase_before"], last["phase_after"], last["action"]) == (phase_under_test, "rolled_back",
                                                                            "rollback")
    assert json.loads(last["evidence"])["decision"]["diff_high"] <= -0.1
    assert gw.gateway.plan.routes["held"].model == "src"


def test_a_restart_resumes_the_evidence_and_the_plan_version(stub, launch_each):
    stub.set("primary", reply=LONG)
    stub.set("candidate", reply=SHORT)
    first = launch_each(plan(stub), config=FAST, policy=policy())
    drive(first, lambda: phase(first) == "canary")
    for _ in range(2):
        ask(first)
    settle(first)
    state = first.gateway.live.cohorts["held"]
    version, rows = first.gateway.live.version, state.paired().rows
    first.server.stop()
    second = launch_each(plan(stub), config=FAST, policy=policy(), registry_path=first.registry.path)
    live = second.gateway.live
    assert live.experiment == first.gateway.live.experiment
    assert (live.version, phase(second), live.cohorts["held"].paired()) == (version, "canary", state.paired())
    assert live.cohorts["held"].paired().rows == rows
    assert second.gateway.plan == first.gateway.plan  # the canary's route, not the file's shadow route
    drive(second, lambda: phase(second) == "done")
    assert [s["version"] for s in steps(second)] == [0, 1, 2, 3]


def test_admin_overrides_and_route_changes_are_recorded_as_plan_steps(stub, launch_each):
    gw = launch_each(plan(stub), config=FAST, policy=policy(), admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    promoted = httpx.post(gw.url + "/admin/live/held", headers=auth, timeout=10,
                          json={"action": "promote", "reason": "looks fine", "actor": "ana"})
    assert promoted.json() == {"cohort": "held", "phase": "canary", "version": 1}
    assert httpx.post(gw.url + "/admin/live/other", headers=auth, timeout=10,
                      json={"action": "rollback", "reason": "x"}).status_code == 409
    assert httpx.post(gw.url + "/admin/live/held", headers=auth, timeout=10,
                      json={"action": "ship", "reason": "x"}).status_code == 400
    assert httpx.post(gw.url + "/admin/live/held", timeout=10, json={}).status_code == 401
    changed = httpx.post(gw.url + "/admin/routes/held", headers=auth, timeout=10,
                         json={"model": "src", "reason": "hold it", "actor": "bo"})
    assert changed.status_code == 200
    recorded = steps(gw)
    assert [(s["phase_before"], s["phase_after"], s["action"], s["actor"]) for s in recorded[1:]] == [
        ("shadow", "canary", "manual_promote", "ana"), ("canary", "manual", "manual_route", "bo")]
    assert phase(gw) == "manual" and gw.gateway.plan.routes["held"].decision == "manual"
    status = httpx.get(gw.url + "/admin/live", headers=auth, timeout=10).json()
    assert status["version"] == 2 and status["cohorts"]["held"]["phase"] == "manual"


def test_feedback_counts_for_its_arm_in_a_canary_and_is_refused_clearly_otherwise(stub, launch_each):
    gw = launch_each(plan(stub), config=FAST, policy=policy(max_answer_chars=None), admin_token=TOKEN)
    httpx.post(gw.url + "/admin/live/held", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
               json={"action": "promote", "reason": "start the canary"})
    answer = ask(gw)
    request_id = answer.json()["id"]
    assert answer.headers["x-request-id"] == request_id
    settle(gw)
    posted = httpx.post(gw.url + "/v1/feedback", timeout=10,
                        json={"request_id": request_id, "metric": "thumbs_up", "value": True})
    assert posted.status_code == 200, posted.text
    body = posted.json()
    assert body["counted"] is True and body["arm"] in ("candidate", "served") and body["cohort"] == "held"
    settle(gw)
    assert [(f["metric"], f["value"]) for f in gw.registry.feedback(request_id)] == [("thumbs_up", 1.0)]
    canary = gw.gateway.live.cohorts["held"].canary
    assert canary.waiting == (1.0,) and canary.waiting_arm == body["arm"]
    unknown = httpx.post(gw.url + "/v1/feedback", timeout=10, json={"request_id": "nope", "metric": "m", "value": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "request_not_found"
    bad = httpx.post(gw.url + "/v1/feedback", timeout=10, json={"request_id": request_id, "metric": "m", "value": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"


def test_drift_below_the_offline_score_is_reported_and_rolls_the_candidate_back_when_asked(stub, launch_each):
    from mergegate.gate import CohortDecision

    stub.set("candidate", reply=LONG)  # every answer breaks the length bound: live score 0 against an offline 0.9
    promoted = plan(stub, served={"model": "cand", "fallback": ["src"]})
    gw = launch_each(promoted, config=FAST, policy=policy(drift_rollback=True), admin_token=TOKEN,
                     before_start=lambda registry: registry.add_decisions("h", "s", "p", [CohortDecision(
                         "served", "promote", "cand", 100, 0.9, "src", 0.8, 0.1, 0.1, 0.0, 0.2, 1.1, 1.0, 1.2,
                         {"src": 0.8})]))
    assert phase(gw, "served") == "done"
    drive(gw, lambda: phase(gw, "served") == "rolled_back", cohort="served")
    assert sample_sum(gw.metrics(), "mergegate_live_drift", model="cand", cohort="served") == 1
    [event] = gw.registry.drift_events(gw.gateway.live.experiment)
    assert (event["model"], event["cohort"], event["offline_score"], event["live_mean"]) == ("cand", "served", 0.9,
                                                                                               0.0)
    last = steps(gw)[-1]
    assert (last["phase_before"], last["action"]) == ("done", "drift")
    route = gw.gateway.plan.routes["served"]
    assert (route.model, route.fallback) == ("src", [])


def test_the_experiment_is_the_candidate_and_the_models_not_the_routes(stub):
    first = RolloutPlan.model_validate(plan(stub))
    rerouted = first.model_copy(update={"routes": {}})
    assert experiment_id(first) == experiment_id(rerouted)
    other = RolloutPlan.model_validate({**plan(stub), "candidate": "src"})
    assert experiment_id(other) != experiment_id(first)
