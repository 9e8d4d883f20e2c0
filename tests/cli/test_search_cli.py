"""`mergegate search` as a user runs it: in a terminal (the search's progress bar on), and refusing bad input
with one line."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ..helpers import assert_refused, write_jsonl
from .helpers import DEMO, MERGEGATE, run_in_terminal

pytestmark = pytest.mark.slow
TRIALS = 2  # the interrupted one, re-run, and one after it: one folder kept, one removed


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


def _search(space: Path, dev: Path, held: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [MERGEGATE, "search", str(space), "--suite", str(dev), "--held-out", str(held), "--policy", str(policy),
            "--out", str(out), "--trials", str(TRIALS), "--keep", "1", "--batch-size", "4", "--max-new-tokens", "8",
            *extra]


def test_search_refuses_an_out_folder_another_search_holds_and_leaves_it_alone(tmp_path):
    from mergegate._staging import locked
    from mergegate.errors import SearchError

    dev, held, policy, space = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.sqlite").write_bytes(b"the running search's study")
    with locked(out, SearchError("held")):  # what a running search holds for as long as it runs
        done = subprocess.run(_search(space, dev, held, policy, out), capture_output=True, text=True, timeout=240)
    assert_refused(done, str(out), "another search")
    assert sorted(p.name for p in out.iterdir()) == ["study.sqlite"]
    assert (out / "study.sqlite").read_bytes() == b"the running search's study"


@pytest.mark.parametrize("case", ["out is a file", "parallel beyond any cluster", "a model folder is missing"])
def test_search_refuses_bad_arguments_with_one_line_and_leaves_nothing(tmp_path, case):
    dev, held, policy, space = _inputs(tmp_path)
    out, extra, expected = tmp_path / "out", [], ""
    if case == "out is a file":
        out.write_text("mine")
        expected = "exists and is not a folder"
    elif case == "parallel beyond any cluster":
        extra, expected = ["--parallel", str(10**15)], "parallel must be a whole number from 1 to"
    else:
        data = yaml.safe_load(space.read_text())
        data["models"][0]["model"] = str(tmp_path / "nowhere")
        space.write_text(yaml.safe_dump(data))
        expected = "no such folder"
    done = subprocess.run(_search(space, dev, held, policy, out, *extra), capture_output=True, text=True,
                          timeout=240)
    assert_refused(done, expected)
    assert out.read_text() == "mine" if case == "out is a file" else not out.exists()


def _study_states(out: Path) -> list[str]:
    storage = out / "study.sqlite"
    try:
        with sqlite3.connect(f"file:{storage}?mode=ro", uri=True, timeout=1) as db:
            return [state for (state,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # not created yet
        return []


@dataclass(frozen=True)
class InterruptedThenResumed:
    out: Path
    interrupted_code: int
    interrupted_stderr: str
    resumed_code: int
    resumed_screen: str


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory) -> InterruptedThenResumed:
    """One search as a user runs it: Ctrl-C once its first trial is being merged, then the same command again in a
    terminal (its progress bar on). Each full search is a fresh interpreter, a local Ray and its workers: one pair
    of runs serves every test below."""
    folder = tmp_path_factory.mktemp("search")
    dev, held, policy, space = _inputs(folder)
    out = folder / "out"
    command = _search(space, dev, held, policy, out)
    # as in a terminal's foreground, Ctrl-C is delivered: a suite started in the background (`make test &`, nohup)
    # ignores SIGINT, and a child inherits that
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:  # Ctrl-C once a trial is being merged
            if "RUNNING" in _study_states(out) and any((out / "trials").glob("trial-*")):
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
        _, stderr = process.communicate(timeout=120)
    code, screen = run_in_terminal(*command[1:], cwd=folder)
    return InterruptedThenResumed(out, process.returncode, stderr, code, screen)


def test_ctrl_c_says_how_to_resume_and_the_resumed_search_leaves_only_the_kept_folders(interrupted_then_resumed):
    runs = interrupted_then_resumed
    assert runs.interrupted_code == 130, runs.interrupted_stderr[-2000:]
    lines = runs.interrupted_stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "run the same command again" in lines[0], lines
    assert "Traceback" not in runs.interrupted_stderr

    assert runs.resumed_code == 0, runs.resumed_screen[-3000:]
    kept = sorted(p.name for p in (runs.out / "trials").iterdir())
    assert len(kept) == 1 and kept[0].startswith("trial-"), kept  # --keep 1: its folder, and no scratch registry


def test_search_in_a_terminal_shows_its_bar_and_writes_the_report(interrupted_then_resumed):
    runs = interrupted_then_resumed
    assert runs.resumed_code == 0, runs.resumed_screen[-3000:]
    assert "Traceback" not in runs.resumed_screen and "searching" in runs.resumed_screen
    assert f"{TRIALS} trials: {TRIALS} complete" in runs.resumed_screen  # the interrupted trial's re-run counted once
    assert (runs.out / "search.html").is_file() and (runs.out / "best.yaml").is_file()
