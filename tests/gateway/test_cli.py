"""`mergegate serve`: the command registers lazily, passes its options through, and `serve` builds a working
gateway from a plan file."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

import mergegate.gateway
from mergegate.cli.serve import register
from mergegate.gateway.testing import ServerThread
from mergegate.rollout import RolloutPlan
from mergegate.serving.launcher import free_port

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
    import mergegate.gateway.server

    plan_path = RolloutPlan.model_validate({"candidate": "base", "models": {"base": {"path": str(family["base"])}},
                                            "routes": {}, "default": {"model": "base"}}).save(tmp_path / "plan.yaml")
    captured = {}
    monkeypatch.setattr(mergegate.gateway.server, "run_app",
                        lambda app, listener, **kw: captured.update(app=app, address=listener.getsockname(), **kw))
    monkeypatch.setenv("MERGEGATE_ADMIN_TOKEN", "t0k")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mergegate.gateway.serve(plan_path, port=port, registry=tmp_path / "r.db")
    assert captured["address"] == ("127.0.0.1", port)  # the port was taken before the models load
    with ServerThread(captured["app"]) as server:
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                            json={"model": "mergegate", "messages": MESSAGES, "max_tokens": 2}).json()
        assert answer["model"] == "base"
        plan = httpx.get(server.url + "/admin/plan", headers={"Authorization": "Bearer t0k"}, timeout=10)
        assert plan.status_code == 200 and plan.json()["path"] == str(plan_path)


# -- ports, urls and what serving says ------------------------------------------------------------------------------

MERGEGATE = str(Path(sys.executable).with_name("mergegate"))


def _never_serve(monkeypatch) -> None:
    """A test that expects a refusal fails (rather than serving forever) if anything starts serving."""
    import uvicorn

    def served(*args, **kwargs):
        raise AssertionError("the command started serving")

    monkeypatch.setattr(uvicorn, "run", served)
    monkeypatch.setattr(uvicorn.Server, "run", served)


def _plan_file(tmp_path, family) -> Path:
    return RolloutPlan.model_validate({"candidate": "base", "models": {"base": {"path": str(family["base"])}},
                                       "routes": {}, "default": {"model": "base"}}).save(tmp_path / "plan.yaml")


@pytest.mark.parametrize("port", ["0", "-1", "65536", str(65536 + 8080)])
def test_serve_and_serve_folder_refuse_a_port_outside_1_to_65535_in_one_line(monkeypatch, family, tmp_path, port):
    _never_serve(monkeypatch)
    called = []
    monkeypatch.setattr(mergegate.gateway, "serve", lambda *args, **kwargs: called.append(args))
    for args in (["serve", str(_plan_file(tmp_path, family)), "--registry", str(tmp_path / "r.db")],
                 ["serve-folder", str(family["base"]), "--served-model-name", "m"]):
        result = CliRunner().invoke(cli(), [*args, "--port", port])
        assert result.exit_code == 2, result.output
        assert called == [] and f"--port {port}" in result.output.replace("'", ""), result.output


def test_serve_refuses_a_plan_model_whose_url_is_not_http(monkeypatch, tmp_path):
    _never_serve(monkeypatch)
    plan = tmp_path / "plan.yaml"
    plan.write_text("candidate: m\nmodels: {m: {url: 'file:///etc/passwd'}}\nroutes: {}\ndefault: {model: m}\n")
    result = CliRunner().invoke(cli(), ["serve", str(plan), "--registry", str(tmp_path / "r.db")])
    assert result.exit_code == 2
    assert "models.m: url 'file:///etc/passwd': the scheme must be http or https" in result.output


def test_serve_refuses_an_otlp_endpoint_that_is_not_http(monkeypatch, family, tmp_path):
    _never_serve(monkeypatch)
    result = CliRunner().invoke(cli(), ["serve", str(_plan_file(tmp_path, family)), "--registry",
                                        str(tmp_path / "r.db"), "--otlp-endpoint", "file:///tmp/spans"])
    assert result.exit_code == 2 and "--otlp-endpoint" in result.output and "http or https" in result.output


def _said(command: list[str], until: str, env: dict | None = None, then=lambda: None) -> list[str]:
    """The lines a serving command prints, up to the first that holds `until` (within 5 minutes: a bound for
    "never", on a busy machine); then `then()` runs and the command is stopped."""
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in server.stdout], daemon=True).start()
    said: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while not said or until not in said[-1]:
            try:
                said.append(lines.get(timeout=1))
            except queue.Empty:
                assert server.poll() is None or not lines.empty(), f"it ended ({server.returncode}): {said}"
                assert time.monotonic() < deadline, f"no line with {until!r} within 300 s: {said}"
        then()
        return said
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("given, said", [("", "--admin-token is empty"), ("   ", "--admin-token is empty"),
                                         (None, "no --admin-token (nor MERGEGATE_ADMIN_TOKEN)")])
def test_serve_says_at_start_when_the_admin_api_is_off(family, tmp_path, given, said):
    token = [] if given is None else ["--admin-token", given]
    env = {k: v for k, v in os.environ.items() if k != "MERGEGATE_ADMIN_TOKEN"}
    lines = _said([MERGEGATE, "serve", str(_plan_file(tmp_path, family)), "--registry", str(tmp_path / "r.db"),
                   "--port", str(free_port()), *token], until="admin API", env=env)
    assert lines[-1] == f"mergegate: {said}: the admin API (/admin) is off", lines


@pytest.mark.slow
def test_serve_on_a_busy_port_is_refused_before_any_model_loads(family, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["serve", _plan_file(tmp_path, family), "--registry", tmp_path / "r.db"],
                     ["serve-folder", family["base"], "--served-model-name", "m", "--device", "cpu"]):
            done = subprocess.run([MERGEGATE, *map(str, args), "--port", str(port)], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip() == f"mergegate: --port {port}: cannot listen on 127.0.0.1:{port}: " \
                                          "Address already in use", done.stderr
            assert done.stdout == ""


@pytest.mark.slow
def test_serve_folder_says_where_it_listens_and_when_it_is_ready(family):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    answered: list[dict] = []
    said = _said([MERGEGATE, "serve-folder", str(family["base"]), "--port", str(port), "--served-model-name",
                  "tiny", "--device", "cpu"], until="ready", then=lambda: answered.append(
                      httpx.get(url + "/models", timeout=30).json()))
    assert said[0] == f"mergegate: serve-folder: loading {family['base']} as 'tiny'; it answers at {url} once " \
                      "loaded", said  # at once: where it will answer
    assert said[-1] == f"mergegate: serve-folder: ready: 'tiny' at {url}", said  # once the model has loaded
    assert [entry["id"] for entry in answered[0]["data"]][0] == "tiny"  # and it answers there


@pytest.mark.slow
def test_serve_says_where_it_listens_and_when_it_is_ready(family, tmp_path):
    port = free_port()
    plan = _plan_file(tmp_path, family)
    said = _said([MERGEGATE, "serve", str(plan), "--registry", str(tmp_path / "r.db"), "--port", str(port),
                  "--admin-token", "t0k"], until="ready")
    assert said[0] == f"mergegate: serve: loading {plan}'s models; it answers at http://127.0.0.1:{port}/v1 " \
                      "once loaded", said
    assert said[-1] == f"mergegate: serve: ready: {plan} at http://127.0.0.1:{port}/v1", said
