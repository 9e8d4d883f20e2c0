"""Suites, the runner and the registry: identical rows for every model, cached sources, resumable runs."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mergegate.evaluate import ModelSpec, SuiteError, evaluate_models, load_suite
from mergegate.evaluate import runner as runner_module
from mergegate.registry import Registry

ROWS = [
    {"id": f"r{i}", "cohort": "echo" if i % 2 else "json_output", "prompt": f"say {i}:", "expected": str(i),
     "evaluators": ["exact_match"] if i % 2 else ["json_valid"]}
    for i in range(10)
]


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def test_malformed_rows_are_reported_by_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps({"id": "x", "cohort": "c", "prompt": "p"}),
             json.dumps({**ROWS[1], "evaluators": ["vibes"]}), json.dumps(ROWS[0]),
             json.dumps({**ROWS[2], "id": "s", "evaluators": ["json_schema"]})]
    path.write_text("\n".join(lines))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert "5 malformed row(s)" in message
    assert "line 6: row: Value error, evaluator 'json_schema' needs a 'schema'" in message
    assert "line 2: not valid JSON" in message
    assert "line 3: expected: Field required" in message and "line 3: " in message
    assert "line 4: evaluators: Value error, unknown evaluator(s) ['vibes']" in message
    assert "duplicate ids: r0" in message


def test_every_model_answers_the_same_rows_with_tokens_and_latency(family, suite_file, tmp_path):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    specs = [ModelSpec("base", family["base"], "base"), ModelSpec("ft1", family["ft1"], "source")]
    runs = evaluate_models(specs, suite, registry, batch_size=4, max_new_tokens=6, progress=False)
    for name, run in runs.items():
        assert [r.row_id for r in run.results] == [row["id"] for row in ROWS]
        for result in run.results:
            assert result.model_name == name and result.model_hash == run.model_hash
            assert result.prompt_tokens == len(f"say {result.row_id[1:]}:")  # one token per character
            assert 1 <= result.completion_tokens <= 6 and result.latency_ms > 0
            assert set(result.details) == ({"exact_match"} if result.cohort == "echo" else {"json_valid"})
    assert runs["base"].model_hash != runs["ft1"].model_hash
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    assert db.execute("SELECT count(*) FROM row_results").fetchone()[0] == 20
    assert {r[0] for r in db.execute("SELECT role FROM models")} == {"base", "source"}


def test_sources_are_cached_by_model_and_suite_hash(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = ModelSpec("base", family["base"], "base")
    first = evaluate_models([spec], suite, registry, batch_size=5, max_new_tokens=4, progress=False)["base"]

    def no_loading(spec):
        raise AssertionError("a cached model must not be loaded")

    monkeypatch.setattr(runner_module, "load_model", no_loading)
    again = evaluate_models([ModelSpec("renamed", family["base"], "base")], suite, registry, progress=False)
    assert again["renamed"].cached and again["renamed"].run_id == first.run_id
    assert [r.output for r in again["renamed"].results] == [r.output for r in first.results]
    changed = suite_file.parent / "changed.jsonl"
    changed.write_text(suite_file.read_text().replace("say 3:", "say three:"))
    with pytest.raises(AssertionError, match="must not be loaded"):  # a different suite is not a cache hit
        evaluate_models([spec], load_suite(changed), registry, progress=False)


def test_interrupted_run_resumes_without_redoing_rows(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = ModelSpec("ft2", family["ft2"], "source")
    original = runner_module._run_batch
    seen: list[list[str]] = []
    crashed = []

    def crash_on_second_batch(model, tokenizer, name, model_hash, rows, max_new_tokens):
        seen.append([r.id for r in rows])
        if len(seen) == 2 and not crashed:
            crashed.append(True)
            raise RuntimeError("interrupted")
        return original(model, tokenizer, name, model_hash, rows, max_new_tokens)

    monkeypatch.setattr(runner_module, "_run_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_models([spec], suite, registry, batch_size=4, max_new_tokens=4, progress=False)
    first_batch = set(seen[0])
    seen.clear()
    run = evaluate_models([spec], suite, registry, batch_size=4, max_new_tokens=4, progress=False)["ft2"]
    redone = {row_id for batch in seen for row_id in batch}
    assert not redone & first_batch and redone | first_batch == {r["id"] for r in ROWS}
    assert len(run.results) == 10 and not run.cached
