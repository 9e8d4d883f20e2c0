"""`mergegate serve`: the command registers lazily, passes its options through, and `serve` builds a working
gateway from a plan file."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import typer
from typer.testing import CliRunner

import mergegate.gateway
from mergegate.cli.serve import register
from mergegate.gateway.testing import ServerThread
from mergegate.rollout import RolloutPlan

from .helpers import MESSAGES

pytestmark = pytest.mark.one_torch_thread


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """mergegate"""

    register(app)
    return app


def test_registering_serve_imports_no_gateway_and_no_torch():
    code = ("import sys, typer; from mergegate.cli.serve import register; register(typer.Typer()); "
            "print(sorted(m for m in ('mergegate.gateway', 'torch', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_command_passes_its_options_to_serve(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(mergegate.gateway, "serve", lambda plan, **kw: seen.update(plan=plan, **kw))
    monkeypatch.setenv("MERGEGATE_ADMIN_TOKEN", "from-env")
    plan = tmp_path / "rollout.yaml"
    result = CliRunner().invoke(cli(), ["serve", str(plan), "--port", "9999", "--registry", str(tmp_path / "r.db"),
                                        "--traces", str(tmp_path / "t.jsonl"), "--timeout", "2.5",
                                        "--persist-plan", "--stream-max-duration", "600", "--queue-limit", "8",
                                        "--max-admin-body-bytes", "4096"])
    assert result.exit_code == 0, result.output
    assert seen["plan"] == plan and seen["port"] == 9999 and seen["host"] == "127.0.0.1"
    assert seen["admin_token"] == "from-env" and seen["traces_path"] == tmp_path / "t.jsonl"
    assert seen["config"].backend_timeout == 2.5 and seen["config"].persist_plan is True
    assert seen["config"].stream_max_duration == 600 and seen["config"].local_queue_limit == 8
    assert seen["config"].max_admin_body_bytes == 4096
    help_text = CliRunner().invoke(cli(), ["serve", "--help"]).output
    for option in ("--host", "--port", "--registry", "--suite", "--admin-token", "--traces"):
        assert option in help_text


def test_serve_refuses_a_bad_plan_with_exit_code_2(tmp_path):
    bad = tmp_path / "rollout.yaml"
    bad.write_text("candidate: x\nmodels: {}\nroutes: {}\ndefault: {model: x}\n")
    result = CliRunner().invoke(cli(), ["serve", str(bad), "--registry", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "rollout plan" in result.output


@pytest.mark.slow
def test_serve_builds_a_working_gateway_from_the_plan_file(monkeypatch, family, tmp_path):
    import uvicorn

    plan_path = RolloutPlan.model_validate({"candidate": "base", "models": {"base": {"path": str(family["base"])}},
                                            "routes": {}, "default": {"model": "base"}}).save(tmp_path / "plan.yaml")
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("MERGEGATE_ADMIN_TOKEN", "t0k")
    mergegate.gateway.serve(plan_path, port=8123, registry=tmp_path / "r.db")
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 8123)
    with ServerThread(captured["app"]) as server:
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                            json={"model": "mergegate", "messages": MESSAGES, "max_tokens": 2}).json()
        assert answer["model"] == "base"
        plan = httpx.get(server.url + "/admin/plan", headers={"Authorization": "Bearer t0k"}, timeout=10)
        assert plan.status_code == 200 and plan.json()["path"] == str(plan_path)
