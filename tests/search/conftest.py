"""Fixtures of the search tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ..helpers import write_jsonl
from .helpers import COHORTS, DEMO


@pytest.fixture(scope="module")
def suites(tmp_path_factory) -> tuple[Path, Path]:
    """Dev and held-out rows of two cohorts from the demo suite, disjoint: 4 and 4 per cohort."""
    folder = tmp_path_factory.mktemp("suites")
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines() if line.strip()]
    dev, held = folder / "dev.jsonl", folder / "held.jsonl"
    picked = {c: [r for r in rows if r["cohort"] == c] for c in COHORTS}
    write_jsonl(dev, [r for c in COHORTS for r in picked[c][:4]])
    write_jsonl(held, [r for c in COHORTS for r in picked[c][4:8]])
    return dev, held


@pytest.fixture(scope="package")
def local_ray():
    """The local Ray (2 CPUs) of tests/conftest.py, started once for the whole search package instead of once a
    module: its workers, once they have imported torch and loaded the demo models, serve every module's trials."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
