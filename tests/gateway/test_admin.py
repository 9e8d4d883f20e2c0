"""The admin API: bearer auth, route changes that take effect on the next request, recorded in the registry and
(optionally) persisted to the plan file."""

from __future__ import annotations

import time

import httpx
import pytest

from mergegate.gateway import GatewayConfig
from mergegate.rollout import load_plan

from .helpers import MESSAGES, route_of

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]  # every test talks to a live server

TOKEN = "s3cret-token"


def plan(family) -> dict:
    return {
        "candidate": "ft1",
        "models": {"base": {"role": "base", "path": str(family["base"])},
                   "ft1": {"role": "candidate", "path": str(family["ft1"])}},
        "routes": {"chat": {"model": "ft1", "fallback": ["base"], "decision": "promote"}},
        "default": {"model": "base"},
    }


@pytest.fixture
def gw(family, launch_each):
    return launch_each(plan(family), admin_token=TOKEN, config=GatewayConfig(persist_plan=True))


def admin(gw, method: str, path: str, token: str | None = TOKEN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, gw.url + path, headers=headers, timeout=10, **kw)


def answering_model(gw, cohort: str) -> str:
    response = gw.client().chat.completions.with_raw_response.create(
        model="mergegate", messages=MESSAGES, max_tokens=2, extra_headers={"X-Cohort": cohort})
    return route_of(response.headers)["model"]


def test_admin_needs_the_bearer_token(gw):
    missing = admin(gw, "GET", "/admin/plan", token=None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = admin(gw, "GET", "/admin/plan", token="nope")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_token"
    refused = admin(gw, "POST", "/admin/routes/chat", token="nope", json={"model": "base", "reason": "x"})
    assert refused.status_code == 403
    ok = admin(gw, "GET", "/admin/plan")
    assert ok.status_code == 200
    assert ok.json()["plan"]["routes"]["chat"]["model"] == "ft1"
    assert answering_model(gw, "chat") == "ft1"  # the refused change did nothing


def test_admin_is_disabled_without_a_token(family, launch_each):
    gw = launch_each(plan(family))
    response = admin(gw, "GET", "/admin/plan", token="anything")
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


def test_route_change_takes_effect_on_the_next_request_and_is_recorded(gw, family):
    assert answering_model(gw, "chat") == "ft1"
    before = time.time()
    response = admin(gw, "POST", "/admin/routes/chat",
                     json={"model": "base", "reason": "rollback: ft1 regressed on chat", "actor": "alice"})
    assert response.status_code == 200, response.text
    assert response.json() == {"cohort": "chat", "old_model": "ft1", "new_model": "base",
                               "reason": "rollback: ft1 regressed on chat", "actor": "alice", "persisted": True}
    assert answering_model(gw, "chat") == "base"
    change = gw.registry.plan_changes()[-1]
    assert (change["cohort"], change["old_model"], change["new_model"]) == ("chat", "ft1", "base")
    assert change["reason"] == "rollback: ft1 regressed on chat" and change["actor"] == "alice"
    assert before - 1 <= change["created"] <= time.time() + 1
    live = admin(gw, "GET", "/admin/plan").json()["plan"]
    assert live["routes"]["chat"] == {"model": "base", "fallback": ["base"], "mirror": 0.0, "decision": "manual"}
    saved = load_plan(gw.plan_path)  # persisted, and still a valid plan
    assert saved.routes["chat"].model == "base" and saved.models["ft1"].path == str(family["ft1"].resolve())
    assert saved.routes["chat"].decision == "manual"

    promote = admin(gw, "POST", "/admin/routes/default", json={"model": "ft1", "reason": "promote everywhere else"})
    assert promote.status_code == 200 and promote.json()["old_model"] == "base"
    assert answering_model(gw, "anything") == "ft1"
    assert [c["cohort"] for c in gw.registry.plan_changes()] == ["chat", "default"]


def test_bad_route_changes_are_refused_and_change_nothing(gw):
    cases = [
        ("/admin/routes/chat", {"model": "base"}, 400, "reason"),
        ("/admin/routes/chat", {"model": "base", "reason": "   "}, 400, "reason"),
        ("/admin/routes/chat", {"model": "gpt-9", "reason": "x"}, 400, "model"),
        ("/admin/routes/nope", {"model": "base", "reason": "x"}, 404, "cohort"),
    ]
    for path, body, status, param in cases:
        response = admin(gw, "POST", path, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
    broken = admin(gw, "POST", "/admin/routes/chat", content=b"{not json")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert gw.registry.plan_changes() == []
    assert answering_model(gw, "chat") == "ft1"
