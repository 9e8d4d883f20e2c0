"""A search killed with SIGKILL mid-trial resumes where it stopped: the trial in flight is drawn again with the
same recipe, and the finished search holds exactly the trials an uninterrupted one with the same seed holds —
whatever the moment of the kill, including while a trial's values were being drawn (some stored, some not)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mergegate.search import search
from mergegate.search.run import STUDY_NAME

from .helpers import POLICY, space

pytestmark = pytest.mark.slow
TRIALS = 4
SETTINGS = dict(parallel=1, keep=1, seed=0, batch_size=8, max_new_tokens=24, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, suites, local_ray):
    """The search both tests resume, run once without a kill: the trials a resumed one must hold (the second test
    resumes a 3-trial search: the first 3 of these, as a seeded search draws and scores a trial from those before it
    only)."""
    dev, held = suites
    folder = tmp_path_factory.mktemp("uninterrupted")
    return search(space(folder), dev, held, POLICY, folder / "out", trials=TRIALS, **SETTINGS)


def _states(out: Path) -> list[str]:
    """The study's trial states, read straight from its SQLite file, read-only: fast enough to catch a trial in
    flight, and never a writer beside the search (Optuna's own storage object may create or migrate tables)."""
    storage = out / "study.sqlite"
    if not storage.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{storage}?mode=ro", uri=True, timeout=1) as db:
            return [state for (state,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # the study's tables are not created yet
        return []


def test_a_search_killed_mid_trial_resumes_with_the_same_trials(tmp_path, suites, local_ray, uninterrupted):
    dev, held = suites
    space_file = space(tmp_path)
    settings = dict(trials=TRIALS, **SETTINGS)
    reference = uninterrupted

    out = tmp_path / "killed"
    address = local_ray.get_runtime_context().gcs_address
    code = (f"from mergegate.search import search\n"
            f"search({str(space_file)!r}, {str(dev)!r}, {str(held)!r}, {POLICY!r}, {str(out)!r}, "
            f"ray_address={address!r}, **{settings!r})\n")
    log = tmp_path / "killed.log"
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=log.open("wb"))
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # kill once two trials are in and the third is being evaluated
            states = _states(out)
            if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "RUNNING" in states:
                break
            assert process.poll() is None, f"the search ended before it could be killed: {log.read_text()[-3000:]}"
            time.sleep(0.05)
        else:
            pytest.fail("the search never reached its third trial")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert "RUNNING" in _states(out)  # killed mid-trial: the study says so

    resumed = search(space_file, dev, held, POLICY, out, **settings)
    assert [t.params for t in resumed.trials] == [t.params for t in reference.trials]
    assert [(t.status, t.promoted, t.retention) for t in resumed.trials] == [
        (t.status, t.promoted, t.retention) for t in reference.trials]
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.sqlite'}")
    rerun = [t for t in study.get_trials() if "rerun_of" in t.user_attrs]
    assert len(rerun) == 1  # the killed trial, drawn again with its recipe
    killed = study.trials[rerun[0].user_attrs["rerun_of"]]
    assert killed.state.name == "FAIL"
    # killed after its draw: re-run with those values; killed before or while drawing: drawn again whole, and the
    # per-draw seed gives the same values (the trials' params above equal the uninterrupted run's either way)
    assert killed.params.items() <= rerun[0].params.items()
    assert len(resumed.trials) == TRIALS

    again = search(space_file, dev, held, POLICY, out, **settings)  # a finished search is read back, nothing re-run
    assert [t.number for t in again.trials] == [t.number for t in resumed.trials]
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.sqlite'}").trials) == len(
        study.trials)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler, used here only
def test_a_search_killed_while_drawing_a_trial_resumes_with_the_values_it_would_have_drawn(tmp_path, suites,
                                                                                          local_ray, uninterrupted):
    """The moment of the kill that once gave other values: a trial asked, its first value stored, the rest not.
    Re-running it with that one value fixed shifted the seeded sampler's draws onto the others (the second
    weight came back equal to the first). The state is made as the kill leaves it, with no timing."""
    dev, held = suites
    space_file = space(tmp_path)
    reference = uninterrupted
    third = reference.trials[2].params
    out = tmp_path / "killed"
    search(space_file, dev, held, POLICY, out, trials=2, **SETTINGS)
    storage = f"sqlite:///{out / 'study.sqlite'}"
    # the killed search's third trial: asked, the first of its values drawn and stored, then SIGKILL
    first = "models[0].parameters.weight"
    sampler = optuna.samplers.PartialFixedSampler({first: third[first]}, optuna.samplers.RandomSampler())
    killed = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler).ask()
    killed.suggest_float(first, 0.3, 1.2)
    # ... and what a killed trial leaves: its merged folder (of an earlier kill) and its scratch registry
    (out / "trials" / "trial-0002").mkdir()
    (out / "trials" / "trial-0002" / "model.safetensors").write_bytes(b"partial")
    for end in ("", "-wal", "-shm"):
        (out / "trials" / f".trial-0002-eval.sqlite{end}").write_bytes(b"")

    resumed = search(space_file, dev, held, POLICY, out, trials=3, **SETTINGS)
    assert [t.params for t in resumed.trials] == [t.params for t in reference.trials[:3]]
    assert [(t.status, t.promoted, t.retention) for t in resumed.trials] == [
        (t.status, t.promoted, t.retention) for t in reference.trials[:3]]
    # only the kept trial's folder stays (and each trial's server log, when it had one)
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{resumed.best[0].number:04d}"]
