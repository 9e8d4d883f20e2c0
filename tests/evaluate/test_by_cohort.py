"""evaluate_by_cohort: one model's run of the whole suite, a cohort at a time (what a search trial prunes on): the
same cache key, run and results as evaluate_models, resumable when stopped early."""

from __future__ import annotations

import json

import pytest

from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.runner import evaluate_by_cohort
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

ROWS = [{"id": f"r{i}", "cohort": ("echo", "json_output", "third")[i % 3], "prompt": f"say {i}:",
         "expected": str(i), "evaluators": ["exact_match"]} for i in range(9)]
OPTIONS = EvalOptions(batch_size=4, max_new_tokens=3, progress=False, device="cpu", threads=1)


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return load_suite(path)


def test_a_run_by_cohort_is_the_run_evaluate_models_makes(family, suite, tmp_path):
    model = (ModelRef("base", family["base"]), "base")
    registry = Registry(tmp_path / "by-cohort.sqlite")
    seen = [(cohort, [r.row_id for r in run.results]) for cohort, run in evaluate_by_cohort(model, suite, registry,
                                                                                         OPTIONS)]
    assert seen == [("echo", ["r0", "r3", "r6"]), ("json_output", ["r0", "r1", "r3", "r4", "r6", "r7"]),
                    ("third", [f"r{i}" for i in range(9)])]
    alone = evaluate_models([model], suite, Registry(tmp_path / "alone.sqlite"), OPTIONS)["base"]
    last = list(evaluate_by_cohort(model, suite, registry, OPTIONS))[-1][1]  # now read from the cache
    assert last.cached and [r.output for r in last.results] == [r.output for r in alone.results]
    assert registry.run_config(last.run_id) == Registry(tmp_path / "alone.sqlite").run_config(alone.run_id)
    cached = evaluate_models([model], suite, registry, OPTIONS)["base"]  # the whole suite's run, finished
    assert cached.cached and cached.run_id == last.run_id


def test_a_run_stopped_after_a_cohort_resumes_with_the_rest(family, suite, tmp_path):
    model = (ModelRef("base", family["base"]), "base")
    registry = Registry(tmp_path / "r.sqlite")
    cohort, first = next(iter(evaluate_by_cohort(model, suite, registry, OPTIONS)))  # a pruned trial stops here
    assert cohort == "echo" and not first.cached
    resumed = evaluate_models([model], suite, registry, OPTIONS)["base"]
    assert resumed.run_id == first.run_id and len(resumed.results) == len(ROWS)
