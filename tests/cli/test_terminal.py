"""The CLI in a real terminal: stderr is a pseudo-terminal, so the progress bars switch on (`mergegate merge` once
crashed with NameError only there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..helpers import recipe_for
from .helpers import DEMO, run_in_terminal


def test_isatty_really_is_a_terminal(tmp_path):
    code, screen = run_in_terminal("--help", cwd=tmp_path, timeout=60)
    assert code == 0 and "merge" in screen


@pytest.mark.slow
def test_merge_in_a_terminal_shows_a_bar(family, tmp_path, write_recipe):
    recipe = write_recipe(recipe_for("ties", family, density=0.5))
    code, screen = run_in_terminal("merge", recipe, tmp_path / "out", cwd=tmp_path)
    assert code == 0, screen
    assert "Traceback" not in screen
    assert "merging 21 tensors (ties)" in screen  # the rich bar, drawn on the terminal
    assert "merged 21 tensors" in screen
    assert (tmp_path / "out" / "config.json").is_file()


def _small_demo_suite(path: Path, per_cohort: int = 2) -> Path:
    """The first rows of each cohort of the shipped demo suite."""
    kept: dict[str, list[str]] = {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if len(kept.setdefault(row["cohort"], [])) < per_cohort:
            kept[row["cohort"]].append(line)
    path.write_text("\n".join(line for lines in kept.values() for line in lines) + "\n")
    return path


@pytest.mark.slow
def test_evaluate_and_release_in_a_terminal(tmp_path):
    suite = _small_demo_suite(tmp_path / "suite.jsonl")
    code, screen = run_in_terminal("evaluate", f"base={DEMO / 'models' / 'base'}", "--suite", suite,
                                   "--registry", tmp_path / "registry.sqlite", cwd=tmp_path)
    assert code == 0, screen
    assert "Traceback" not in screen and "evaluating base" in screen and "json_output" in screen

    code, screen = run_in_terminal("release", DEMO / "recipes" / "ties.yaml", "--suite", suite,
                                   "--out", tmp_path / "release", cwd=tmp_path)
    assert code == 0, screen
    assert "Traceback" not in screen
    assert "merging" in screen and "evaluating merged-ties" in screen
    assert (tmp_path / "release" / "rollout.yaml").is_file()
