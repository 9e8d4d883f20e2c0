"""`mergegate demo` on a small copy of the demo (the shipped models, 3 rows a cohort): without --search it runs no
search and its summary has no search line. (`--search` itself is not run here: on this 2-core machine its Ray
start, trials and held-out release took 245 s under load; the search has its own tests in tests/search.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
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


def test_beyond_summary_has_the_moe_the_cascade_and_the_gguf_with_numbers(small_demo, tmp_path):
    """`mergegate demo --beyond` on 3 suite rows a cohort (routers and classifier from dev.jsonl, 10 rows a cohort):
    the MoE and the cascade are gated beside the merge, the best merge is exported to GGUF, and the report shows
    all three with their measured numbers."""
    from mergegate.demo import run_demo

    _first_rows(DEMO / "dev.jsonl", small_demo / "dev.jsonl", 10)  # 10 router prompts per expert
    out = tmp_path / "out"
    run_demo(out, small_demo, methods=("linear",), beyond=True)
    sections = {s["anchor"]: s for s in json.loads((out / "beyond.json").read_text())}
    assert list(sections) == ["moe", "ensemble", "gguf"]
    moe = (out / "moe" / "rollout.yaml").read_text()
    assert "candidate: moe" in moe and (out / "moe" / "candidate" / "config.json").is_file()
    ensemble = (out / "ensemble" / "ensembles.yaml").read_text()
    assert "kind: cascade" in ensemble
    report = (out / "report.md").read_text()
    for title in ("## Mixture of experts from the dense experts", "## Ensemble at the gateway",
                  "## Quantized release (GGUF)"):
        assert title in report
    assert re.search(r"Cost: 4\.\d\d M parameters against 1\.\d\d M for one dense model", report)
    assert re.search(r"Extra cost, from the gateway's /metrics: \d+ extra calls over (1[2-9]|20) requests", report)
    tables = {s["anchor"]: [b for b in s["blocks"] if isinstance(b, dict)] for s in sections.values()}
    gguf_rows = {row[0]: row for row in tables["gguf"][0]["rows"]}
    for qtype in ("q8_0", "q4_0"):
        ratio = float(gguf_rows[qtype][2].split()[0])
        assert 0.5 < ratio <= 1.0  # within the format's bound, and the bound is not vacuous
        assert (out / "gguf" / f"merged-linear-{qtype}.gguf").stat().st_size > 100_000
    assert "not served or evaluated per cohort" in report
    html_page = (out / "report.html").read_text()
    assert all(f'<section id="{anchor}">' in html_page for anchor in ("moe", "ensemble", "gguf"))
