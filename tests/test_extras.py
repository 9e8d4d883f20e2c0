"""Optional extras: the core never imports them, and a command that needs a missing one says which to install.

A missing package is simulated with `sys.modules[name] = None` (the import then fails as if it were not installed),
in a subprocess where the process's other imports must not see it."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mergegate._extras import EXTRA_MODULES, install_hint, missing_extra
from mergegate.gate import CohortDecision, GateResult
from mergegate.report import write_reports
from mergegate.rollout import PlanModel, RolloutPlan, Route

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_pyproject_keeps_every_extra_out_of_the_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    core = " ".join(project["dependencies"]).lower()
    for extra in EXTRA_MODULES:
        for requirement in extras[extra]:
            name = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
            assert name not in core, f"{name} is both core and in the {extra} extra"


@pytest.mark.slow
def test_importing_mergegate_and_merge_pulls_no_extra(tmp_path):
    modules = sorted({m for ms in EXTRA_MODULES.values() for m in ms})
    code = (f"import sys, mergegate; mergegate.merge; "
            f"print(sorted({{m for m in sys.modules if m.partition('.')[0] in {modules!r}}}))")
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# a missing uvicorn is found only after the gateway (and torch) imported: the slow case
@pytest.mark.parametrize("module", ["fastapi", pytest.param("uvicorn", marks=pytest.mark.slow), "opentelemetry",
                                    "prometheus_client"])
def test_serve_without_the_serve_extra_exits_2_with_one_line(tmp_path, module):
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['mergegate', 'serve', 'rollout.yaml']; "
            "from mergegate.cli import main; main()")
    done = _run(code, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"mergegate: `mergegate serve` needs the serve extra ({module} is not installed): "
        "pip install 'mergegate[serve]'"]


def test_missing_extra_names_only_modules_an_extra_installs():
    assert missing_extra(ModuleNotFoundError("x", name="opentelemetry.sdk.trace")) == "serve"
    assert missing_extra(ModuleNotFoundError("x", name="matplotlib.pyplot")) == "report"
    assert missing_extra(ModuleNotFoundError("x", name="torch")) is None
    assert missing_extra(ModuleNotFoundError("x")) is None
    assert install_hint("report") == "pip install 'mergegate[report]'"


def _gate_and_plan() -> tuple[GateResult, RolloutPlan]:
    decision = CohortDecision(cohort="json_output", decision="promote", model="merged", rows=20, candidate_mean=0.9,
                              best_source="json", best_source_mean=0.85, base_mean=0.2, diff_mean=0.05,
                              diff_low=-0.01, diff_high=0.1, retention=1.05, retention_low=0.98,
                              retention_high=1.1, source_means={"base": 0.2, "json": 0.85})
    gate = GateResult(candidate="merged", decisions=[decision], aggregate={"merged": 0.9, "base": 0.2, "json": 0.85},
                      policy_sha256="0" * 64)
    plan = RolloutPlan(candidate="merged", models={"merged": PlanModel(role="candidate", path="merged"),
                                                   "base": PlanModel(role="base", path="base")},
                       routes={"json_output": Route(model="merged", decision="promote")}, default=Route(model="base"))
    return gate, plan


def test_report_without_matplotlib_is_written_without_its_chart_and_says_which_extra(tmp_path, monkeypatch, caplog):
    gate, plan = _gate_and_plan()
    write_reports(tmp_path, gate, plan, title="with chart")
    assert (tmp_path / "chart.png").is_file() and "data:image/png" in (tmp_path / "report.html").read_text()

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="mergegate.report"):
        written = write_reports(tmp_path, gate, plan, title="without chart")
    assert [r.getMessage() for r in caplog.records] == [
        "mergegate: report written without its chart (matplotlib is not installed): pip install 'mergegate[report]'"]
    assert all(path.is_file() for path in written.values())
    assert not (tmp_path / "chart.png").exists()  # the earlier run's chart would not match these decisions
    assert "chart.png" not in (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "<img" not in page and "json_output" in page
