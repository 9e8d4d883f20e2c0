"""`mergegate search` as a user runs it: in a terminal (the search's progress bar on), and refusing bad input
with one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ..conftest import assert_refused, write_jsonl
from .test_terminal import DEMO, MERGEGATE, run_in_terminal

pytestmark = pytest.mark.slow


def _inputs(folder: Path) -> tuple[Path, Path, Path, Path]:
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines() if line.strip()]
    tool = [r for r in rows if r["cohort"] == "tool_required"]
    dev, held, policy, space = (folder / n for n in ("dev.jsonl", "held.jsonl", "policy.yaml", "space.yaml"))
    write_jsonl(dev, tool[:3])
    write_jsonl(held, tool[3:6])
    policy.write_text(yaml.safe_dump({"default": {"min_rows": 3}}))
    models = DEMO / "models"
    space.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(models / "base"),
        "models": [{"model": str(models / "tool_required"), "parameters": {"weight": {"range": [0.5, 1.0]}}}],
        "parameters": {"lambda": 1.0}, "dtype": "float32"}))
    return dev, held, policy, space


def test_search_in_a_terminal_shows_its_bar_and_writes_the_report(tmp_path):
    dev, held, policy, space = _inputs(tmp_path)
    code, screen = run_in_terminal("search", space, "--suite", dev, "--held-out", held, "--policy", policy,
                                   "--trials", "2", "--keep", "1", "--out", tmp_path / "out", "--batch-size", "4",
                                   "--max-new-tokens", "24", cwd=tmp_path)
    assert code == 0, screen[-3000:]
    assert "Traceback" not in screen and "searching" in screen
    assert "2 trials: 2 complete" in screen
    assert (tmp_path / "out" / "search.html").is_file() and (tmp_path / "out" / "best.yaml").is_file()


def test_search_refuses_a_held_out_suite_that_overlaps_the_dev_rows(tmp_path):
    dev, _, policy, space = _inputs(tmp_path)
    done = subprocess.run([MERGEGATE, "search", str(space), "--suite", str(dev), "--held-out", str(dev), "--policy",
                           str(policy), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert_refused(done, "share 3 row id(s)")
    assert not (tmp_path / "out").exists()


def test_search_refuses_a_bad_space_naming_the_field(tmp_path):
    dev, held, policy, space = _inputs(tmp_path)
    data = yaml.safe_load(space.read_text())
    data["parameters"]["lambda"] = {"range": [1.0, 0.5]}
    space.write_text(yaml.safe_dump(data))
    done = subprocess.run([MERGEGATE, "search", str(space), "--suite", str(dev), "--held-out", str(held),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert_refused(done, "parameters.lambda.range: LOW must be below HIGH")
