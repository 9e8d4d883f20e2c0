"""`mergegate demo` on a small copy of the demo (the shipped models, 3 rows a cohort): without --search it runs no
search and its summary has no search line. (`--search` itself is not run here: on this 2-core machine its Ray
start, trials and held-out release took 245 s under load; the search has its own tests in tests/search.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
pytestmark = [pytest.mark.slow, pytest.mark.one_torch_thread,
              pytest.mark.skipif(not (DEMO / "models" / "base" / "config.json").is_file(),
                                 reason="demo models not built")]


def _first_rows(source: Path, target: Path, per_cohort: int) -> None:
    """The first `per_cohort` rows of every cohort of a suite."""
    kept: dict[str, int] = {}
    lines = []
    for line in source.read_text().splitlines():
        cohort = json.loads(line)["cohort"]
        if kept.get(cohort, 0) < per_cohort:
            kept[cohort] = kept.get(cohort, 0) + 1
            lines.append(line)
    target.write_text("\n".join(lines) + "\n")


@pytest.fixture
def small_demo(tmp_path) -> Path:
    """The demo folder with the shipped models, recipes, policy and search space, and 3 rows a cohort."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "models").symlink_to(DEMO / "models")
    for name in ("recipes", "search"):
        shutil.copytree(DEMO / name, folder / name)
    shutil.copy(DEMO / "policy.yaml", folder / "policy.yaml")
    _first_rows(DEMO / "suite.jsonl", folder / "suite.jsonl", 3)
    _first_rows(DEMO / "dev.jsonl", folder / "dev.jsonl", 3)
    return folder


def test_plain_demo_summary_has_no_search_line(small_demo, tmp_path):
    from mergegate.demo import run_demo

    out = tmp_path / "out"
    run_demo(out, small_demo, methods=("linear",))
    assert not (out / "search").exists()
    assert "Merge search" not in (out / "report.md").read_text()
    assert os.path.isfile(out / "rollout.yaml")
