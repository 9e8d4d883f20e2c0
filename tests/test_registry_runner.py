"""Suites, the runner and the registry: identical rows for every model, cached sources, resumable runs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate import MergegateError
from mergegate.evaluate import EvalOptions, SuiteError, evaluate_models, load_suite
from mergegate.evaluate import evaluators as evaluators_module
from mergegate.evaluate import local as local_module
from mergegate.io.hashing import folder_hash
from mergegate.model_ref import ModelRef
from mergegate.registry import SCHEMA_VERSION, Registry

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"

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
    assert "line 6: row: evaluator 'json_schema' needs a 'schema'" in message
    assert "line 2: not valid JSON" in message
    assert "line 3: expected: Field required" in message and "line 3: " in message
    assert "line 4: evaluators: unknown evaluator(s) ['vibes']" in message
    assert "line 5: duplicate id 'r0' (first used on line 1)" in message


def test_every_model_answers_the_same_rows_with_tokens_and_latency(family, suite_file, tmp_path):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    specs = [(ModelRef("base", family["base"]), "base"), (ModelRef("ft1", family["ft1"]), "source")]
    runs = evaluate_models(specs, suite, registry, EvalOptions(batch_size=4, max_new_tokens=6, progress=False))
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


def test_sources_are_cached_by_model_suite_and_config(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    first = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["base"]

    def no_loading(spec, device=None):
        raise AssertionError("a cached model must not be loaded")

    monkeypatch.setattr(local_module, "load_model", no_loading)
    again = evaluate_models([(ModelRef("renamed", family["base"]), "base")], suite, registry,
                            EvalOptions(batch_size=3, max_new_tokens=4, progress=False))
    assert again["renamed"].cached and again["renamed"].run_id == first.run_id
    assert [r.output for r in again["renamed"].results] == [r.output for r in first.results]
    changed = suite_file.parent / "changed.jsonl"
    changed.write_text(suite_file.read_text().replace("say 3:", "say three:"))
    with pytest.raises(AssertionError, match="must not be loaded"):  # a different suite is not a cache hit
        evaluate_models([spec], load_suite(changed), registry, EvalOptions(max_new_tokens=4, progress=False))
    with pytest.raises(AssertionError, match="must not be loaded"):  # other generation settings: not a hit either
        evaluate_models([spec], suite, registry, EvalOptions(max_new_tokens=5, progress=False))


def test_interrupted_run_resumes_without_redoing_rows(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("ft2", family["ft2"]), "source")
    original = local_module._answer_rows
    recorded: list[str] = []
    crashed = []

    def crash_after_first_results(model, tokenizer, name, model_hash, rows, batch_size, max_new_tokens):
        for results in original(model, tokenizer, name, model_hash, rows, batch_size, max_new_tokens):
            if recorded and not crashed:
                crashed.append(True)
                raise RuntimeError("interrupted")
            recorded.extend(r.row_id for r in results)
            yield results

    monkeypatch.setattr(local_module, "_answer_rows", crash_after_first_results)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_models([spec], suite, registry, EvalOptions(batch_size=4, max_new_tokens=4, progress=False))
    first = set(recorded)
    recorded.clear()
    run = evaluate_models([spec], suite, registry, EvalOptions(batch_size=4, max_new_tokens=4, progress=False))["ft2"]
    redone = set(recorded)
    assert first and not redone & first and redone | first == {r["id"] for r in ROWS}
    assert len(run.results) == 10 and not run.cached


# --- per-row latency (issue 13) -------------------------------------------------------------------------------


def _ticking(monkeypatch):
    """The runner's clock made to advance one second per reading: the batch's start reads 0, the generation
    step that appends each row's k-th new token reads k (no likelihood rows, so nothing else reads it)."""
    import itertools
    from types import SimpleNamespace

    ticks = itertools.count()
    monkeypatch.setattr(local_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))


def _answer(model, tokenizer, rows) -> list:
    """Every row's result, all rows generated together (max_new_tokens 20)."""
    return [r for results in local_module._answer_rows(model, tokenizer, "base", "h", list(rows), len(rows), 20)
            for r in results]


def test_each_rows_latency_ends_when_its_own_answer_was_complete(family, tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "cohort": "echo", "prompt": f"say {i}:", "expected": "7" * (i % 4 + 1),
             "evaluators": ["exact_match"]} for i in range(8)]
    (tmp_path / "suite.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    suite = load_suite(tmp_path / "suite.jsonl")
    budgets = {row.id: 2 * len(row.expected) + 8 for row in suite.rows}  # one token per character: 10 to 16
    model, tokenizer = local_module.load_model(ModelRef("base", family["base"]))
    _ticking(monkeypatch)
    # the tiny model never says EOS: every row's answer is final at its own budget, not when the batch ends
    results = _answer(model, tokenizer, suite.rows)
    assert {r.row_id: r.latency_ms for r in results} == {i: 1000.0 * b for i, b in budgets.items()}
    # a row that ends early (its EOS) is answered at that step, while the rest of its batch runs on
    stop = results[0].output[2]
    assert stop not in results[0].output[:2]
    tokenizer.eos_token = stop
    _ticking(monkeypatch)
    stopped = {r.row_id: r for r in _answer(model, tokenizer, suite.rows)}
    assert stopped["r0"].completion_tokens == 3 and stopped["r0"].latency_ms == 3000.0
    assert max(r.latency_ms for r in stopped.values()) == 16000.0
    for r in stopped.values():  # never before its last token, never after its budget
        assert 1000.0 * r.completion_tokens <= r.latency_ms <= 1000.0 * budgets[r.row_id]


def test_latency_is_per_row_within_the_runs_wall_time(family, suite_file, tmp_path, monkeypatch):
    import time

    walls = []
    original = local_module._answer_rows

    def timed(*args):
        started = time.perf_counter()
        results = [r for batch in original(*args) for r in batch]
        walls.append(((time.perf_counter() - started) * 1000, results))
        yield results

    monkeypatch.setattr(local_module, "_answer_rows", timed)
    evaluate_models([(ModelRef("base", family["base"]), "base")], load_suite(suite_file),
                    Registry(tmp_path / "r.sqlite"), EvalOptions(batch_size=4, max_new_tokens=12, progress=False))
    (wall, results), = walls
    assert len(results) == 10 and all(0 < r.latency_ms <= wall for r in results)


def test_runs_recorded_with_batch_latencies_are_not_served(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    monkeypatch.setattr(local_module, "RUNNER_FORMAT", "2")  # the format that recorded the batch's wall time
    old = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["base"]
    monkeypatch.undo()
    now = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["base"]
    assert not now.cached and now.run_id != old.run_id

# --- the cache key: everything that changes an answer (issue 8) --------------------------------------------


def _runs(db_path) -> list[tuple]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT id, status, (SELECT count(*) FROM row_results WHERE run_id=eval_runs.id) "
                          "FROM eval_runs ORDER BY id").fetchall()
    finally:
        db.close()


def test_generation_settings_are_part_of_the_cache_key(family, suite_file, tmp_path):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    short = evaluate_models([spec], suite, registry, EvalOptions(batch_size=4, max_new_tokens=1, progress=False))["base"]
    assert all(r.completion_tokens <= 1 for r in short.results)
    full = evaluate_models([spec], suite, registry, EvalOptions(batch_size=4, max_new_tokens=6, progress=False))["base"]
    assert not full.cached and full.run_id != short.run_id  # a --max-new-tokens 1 run is not a normal run
    assert max(r.completion_tokens for r in full.results) > 1
    # batch size does not change an answer: not part of the key
    again = evaluate_models([spec], suite, registry, EvalOptions(batch_size=7, max_new_tokens=6, progress=False))["base"]
    assert again.cached and again.run_id == full.run_id
    stored = json.loads(sqlite3.connect(tmp_path / "registry.sqlite").execute(
        "SELECT config FROM eval_runs WHERE id=?", (full.run_id,)).fetchone()[0])
    assert stored["generation"]["max_new_tokens"] == 6 and set(stored["evaluators"]) == {"exact_match", "json_valid"}
    assert stored["runner"] == local_module.RUNNER_FORMAT and "transformers" in stored["libraries"]


def test_a_new_evaluator_version_is_not_served_old_scores(family, suite_file, tmp_path, monkeypatch):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    first = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=3, progress=False))["base"]
    monkeypatch.setattr(evaluators_module.ExactMatch, "version", "2")
    again = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=3, progress=False))["base"]
    assert not again.cached and again.run_id != first.run_id


@pytest.mark.slow
def test_greedy_answers_do_not_depend_on_batch_size(tmp_path):
    """Why batch size is not in the cache key: on the demo models, every row gets the same answer whatever rows
    it is batched with (its token budget is its own; left padding is masked)."""
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines()]
    picked = [row for cohort in ("arithmetic", "tool_required", "json_output", "policy_refusal")
              for row in [r for r in rows if r["cohort"] == cohort][:5]]
    suite = load_suite(_write_rows(tmp_path / "suite.jsonl", picked))
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("json_output", DEMO / "models" / "json_output"), "source")
    answers = []
    for size in (1, 6, 20):
        run = evaluate_models([spec], suite, registry,
                              EvalOptions(batch_size=size, force=True, progress=False, threads=1))
        answers.append([(r.row_id, r.output, r.score) for r in run["json_output"].results])
    assert answers[0] == answers[1] == answers[2]
    assert len({a[2] for a in answers[0]}) > 1  # real answers: some right, some wrong


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --- the model hash: files on disk (issue 9) ----------------------------------------------------------------


def test_replacing_a_merged_models_weights_is_not_served_old_scores(family, suite_file, tmp_path):
    import mergegate

    from .helpers import recipe_for

    merged = tmp_path / "merged"
    mergegate.merge(recipe_for("linear", family, models=("ft1", "ft2"), base=False), merged, progress=False)
    assert (merged / "mergegate.json").is_file()
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("merged", merged), "candidate")
    first = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["merged"]
    shutil.copyfile(family["ft3"] / "model.safetensors", merged / "model.safetensors")  # mergegate.json unchanged
    again = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["merged"]
    assert not again.cached and again.model_hash != first.model_hash
    ft3 = evaluate_models([(ModelRef("ft3", family["ft3"]), "source")], suite, registry,
                          EvalOptions(batch_size=5, max_new_tokens=4, progress=False))["ft3"]
    assert [r.output for r in again.results] == [r.output for r in ft3.results]


@pytest.mark.parametrize("name, content", [
    ("generation_config.json", '{"do_sample": false, "repetition_penalty": 1.3}'),
    ("tokenizer_config.json", '{"add_bos_token": false}'),
    ("chat_template.jinja", "{{ messages }}"),
])
def test_files_that_change_answers_are_part_of_the_model_hash(family, tmp_path, name, content):
    copy = shutil.copytree(family["base"], tmp_path / "copy")
    before = folder_hash(copy)
    assert before == folder_hash(family["base"])  # the hash is of the content, not the path
    (copy / name).write_text(content)
    assert folder_hash(copy) != before


# --- argument checks and complete runs (issue 10) -----------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": -3}, "batch size must be an integer >= 1, got -3"),
    ({"batch_size": 0}, "batch size must be an integer >= 1, got 0"),
    ({"max_new_tokens": 0}, "max new tokens must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_before_anything_is_recorded(family, suite_file, tmp_path, settings, message):
    registry = Registry(tmp_path / "registry.sqlite")
    with pytest.raises(MergegateError, match=message):
        evaluate_models([(ModelRef("base", family["base"]), "base")], load_suite(suite_file), registry,
                        EvalOptions(progress=False, **settings))
    assert _runs(tmp_path / "registry.sqlite") == []


def test_missing_model_folder_is_refused_by_name(family, suite_file, tmp_path):
    registry = Registry(tmp_path / "registry.sqlite")
    with pytest.raises(MergegateError, match=r"model 'ghost': .*nowhere: no such folder"):
        evaluate_models([(ModelRef("base", family["base"]), "base"),
                         (ModelRef("ghost", tmp_path / "nowhere"), "source")],
                        load_suite(suite_file), registry, EvalOptions(progress=False))
    assert _runs(tmp_path / "registry.sqlite") == []


def test_a_finished_run_missing_rows_is_not_served(family, suite_file, tmp_path):
    suite = load_suite(suite_file)
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    first = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=3, progress=False))["base"]
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    with db:
        db.execute("DELETE FROM row_results WHERE run_id=? AND row_id IN ('r3', 'r7')", (first.run_id,))
    db.close()
    again = evaluate_models([spec], suite, registry, EvalOptions(batch_size=5, max_new_tokens=3, progress=False))["base"]
    assert not again.cached
    assert [r.row_id for r in again.results] == [row["id"] for row in ROWS]
    assert [r.output for r in again.results] == [r.output for r in first.results]
    with pytest.raises(MergegateError, match=r"has no result for 2 row\(s\) \(r3, r7\); not finished"):
        registry.finish_run(first.run_id, [row["id"] for row in ROWS])


V1_SCHEMA = """
CREATE TABLE models (hash TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, adapter TEXT, role TEXT NOT NULL,
    lineage TEXT NOT NULL, provenance TEXT, registered REAL NOT NULL);
CREATE TABLE eval_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, model_hash TEXT NOT NULL REFERENCES models(hash),
    suite_hash TEXT NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, finished REAL);
CREATE INDEX eval_runs_key ON eval_runs(model_hash, suite_hash, status);
CREATE TABLE row_results (run_id INTEGER NOT NULL REFERENCES eval_runs(id), row_id TEXT NOT NULL, cohort TEXT NOT NULL,
    model_name TEXT NOT NULL, model_hash TEXT NOT NULL, output TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, score REAL NOT NULL, passed INTEGER NOT NULL,
    details TEXT NOT NULL, PRIMARY KEY (run_id, row_id));
"""


def test_an_old_registry_opens_and_its_unkeyed_runs_are_not_served(family, suite_file, tmp_path):
    path = tmp_path / "old.sqlite"
    suite = load_suite(suite_file)
    model_hash = folder_hash(family["base"])
    db = sqlite3.connect(path)
    with db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO models VALUES (?,?,?,?,?,?,?,?)", (model_hash, "base", "x", None, "base", "{}", None, 0))
        db.execute("INSERT INTO eval_runs (model_hash, suite_hash, status, started, finished) VALUES (?,?,?,?,?)",
                   (model_hash, suite.sha256, "finished", 0, 0))
        db.executemany("INSERT INTO row_results VALUES (1,?,?,?,?,?,?,?,?,?,?,?)",
                       [(r["id"], r["cohort"], "base", model_hash, "stale", 1, 1, 1.0, 1.0, 1, "{}") for r in ROWS])
    db.close()
    registry = Registry(path)
    run = evaluate_models([(ModelRef("base", family["base"]), "base")], suite, registry,
                          EvalOptions(batch_size=5, max_new_tokens=3, progress=False))["base"]
    assert not run.cached and run.run_id == 2 and "stale" not in {r.output for r in run.results}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # rows stored before measurement times were kept have none; the new run's rows have this session's
    assert all(m.undated == m.rows and m.first is None for m in registry.measurements(1).values())
    assert {m.sessions for m in registry.measurements(2).values()} == {frozenset({registry.session})}


@pytest.mark.parametrize("kind", ["folder", "not sqlite"])
def test_an_unopenable_registry_is_refused_by_path(tmp_path, kind):
    path = tmp_path / "registry.sqlite"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("these are not the tables you are looking for\n" * 100)
    with pytest.raises(MergegateError, match=f"registry {path}"):
        Registry(path)


# --- suite order (issue 11) ---------------------------------------------------------------------------------


def test_cached_results_come_back_in_suite_order(family, tmp_path):
    rows = [{"id": f"z{9 - i}", "cohort": "c" if i % 3 else "d", "prompt": "say " + "x" * (10 - i) + ":",
             "expected": "x", "evaluators": ["exact_match"]} for i in range(10)]
    suite = load_suite(_write_rows(tmp_path / "suite.jsonl", rows))
    registry = Registry(tmp_path / "registry.sqlite")
    spec = (ModelRef("base", family["base"]), "base")
    first = evaluate_models([spec], suite, registry, EvalOptions(batch_size=3, max_new_tokens=3, progress=False))["base"]
    again = evaluate_models([spec], suite, registry, EvalOptions(batch_size=3, max_new_tokens=3, progress=False))["base"]
    assert again.cached
    assert [r.row_id for r in first.results] == [r.row_id for r in again.results] == [r["id"] for r in rows]
    assert first.results == again.results


# --- suite files (issue 18) ---------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in ROWS).encode())
    assert [row.id for row in load_suite(path).rows] == [r["id"] for r in ROWS]


def test_invalid_utf8_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS[:3]]
    lines[1] = json.dumps({**ROWS[1], "prompt": "café"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(SuiteError, match=r"latin1.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column \d+\)$"):
        load_suite(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write_rows(tmp_path / "dup.jsonl", [ROWS[0], ROWS[1], ROWS[2], {**ROWS[3], "id": "r1"}])
    with pytest.raises(SuiteError, match=r"dup.jsonl: line 4: duplicate id 'r1' \(first used on line 2\)$"):
        load_suite(path)


_ROW_KEYS = ["id", "cohort", "prompt", "expected", "evaluators", "context", "schema", "tools", "extra"]
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6),
                               st.sampled_from(["exact_match", "json_schema", "groundedness", "perplexity", "r1"])),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                     max_leaves=8)
_ROW = st.one_of(
    st.dictionaries(st.sampled_from(_ROW_KEYS), _JSON, max_size=8),
    st.fixed_dictionaries(  # close to valid: duplicate ids, empty cohorts, unknown evaluators, missing inputs
        {"id": st.sampled_from(["a", "b", "c", ""]), "cohort": st.sampled_from(["x", "y", ""]), "prompt": st.text(max_size=5),
         "expected": st.text(max_size=5),
         "evaluators": st.lists(st.sampled_from(["exact_match", "json_valid", "json_schema", "groundedness", "vibes"]),
                                max_size=2)},
        optional={"schema": st.one_of(st.just({"type": "object"}), st.just({"type": 5}), _JSON),
                  "context": st.text(max_size=5), "tools": st.lists(st.text(max_size=3), max_size=2)}),
)


def _check_suite_bytes(tmp_path, data: bytes) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(data)
    try:
        suite = load_suite(path)
    except SuiteError as exc:
        assert str(exc).startswith(f"suite {path}: ")
    else:
        assert suite.rows and len({row.id for row in suite.rows}) == len(suite.rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(), st.text().map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_bytes_are_a_suite_or_a_suite_error(tmp_path, data):
    _check_suite_bytes(tmp_path, data)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(_ROW, _JSON), max_size=5), bom=st.booleans())
def test_any_json_lines_are_a_suite_or_a_suite_error(tmp_path, rows, bom):
    text = "\n".join(json.dumps(r) for r in rows)
    _check_suite_bytes(tmp_path, (b"\xef\xbb\xbf" if bom else b"") + text.encode())
