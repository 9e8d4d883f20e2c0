"""A remote-only gateway never imports torch: neither building and starting it over a plan of url models (and
answering through it), nor `mergegate serve --help`. Each runs in a fresh interpreter, since this test
process has torch loaded already."""

from __future__ import annotations

import subprocess
import sys

import pytest

REMOTE_ONLY = """
import sys, httpx
from mergegate.gateway import create_app
from mergegate.gateway.testing import ServerThread, StubUpstream
from mergegate.registry import Registry
from mergegate.rollout import RolloutPlan

stub = StubUpstream()
with ServerThread(stub.app) as upstream:
    plan = RolloutPlan.model_validate({
        "candidate": "b",
        "models": {"a": {"role": "base", "url": upstream.url + "/v1"},
                   "b": {"role": "candidate", "url": upstream.url + "/v1", "upstream_model": "bee"}},
        "routes": {"code": {"model": "b", "fallback": ["a"], "check": "json_valid"}},
        "default": {"model": "a"}})
    app = create_app(plan, registry=Registry(sys.argv[1]))
    with ServerThread(app) as gateway:
        answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
            "model": "mergegate", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
print("torch" in sys.modules)
"""


@pytest.mark.slow
def test_a_remote_only_gateway_starts_and_answers_without_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", REMOTE_ONLY, str(tmp_path / "registry.sqlite")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_serve_help_does_not_import_torch():
    code = ("import sys; from mergegate.cli import app; import typer.testing as t; "
            "r = t.CliRunner().invoke(app, ['serve', '--help']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
