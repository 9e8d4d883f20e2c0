"""The registry: one SQLite file holding models (lineage, provenance), eval runs, row results, gate
decisions and rollout-plan changes. Source results are cached by (model hash, suite hash); an interrupted
run resumes from the rows it has."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, adapter TEXT, role TEXT NOT NULL,
    lineage TEXT NOT NULL, provenance TEXT, registered REAL NOT NULL);
CREATE TABLE IF NOT EXISTS eval_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model_hash TEXT NOT NULL REFERENCES models(hash),
    suite_hash TEXT NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, finished REAL);
CREATE INDEX IF NOT EXISTS eval_runs_key ON eval_runs(model_hash, suite_hash, status);
CREATE TABLE IF NOT EXISTS row_results (
    run_id INTEGER NOT NULL REFERENCES eval_runs(id), row_id TEXT NOT NULL, cohort TEXT NOT NULL,
    model_name TEXT NOT NULL, model_hash TEXT NOT NULL, output TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, score REAL NOT NULL, passed INTEGER NOT NULL,
    details TEXT NOT NULL, PRIMARY KEY (run_id, row_id));
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, candidate_hash TEXT NOT NULL, suite_hash TEXT NOT NULL,
    policy_hash TEXT NOT NULL, cohort TEXT NOT NULL, decision TEXT NOT NULL, model TEXT NOT NULL,
    numbers TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plan_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cohort TEXT NOT NULL, old_model TEXT, new_model TEXT NOT NULL,
    reason TEXT NOT NULL, actor TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS mirror_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, cohort TEXT NOT NULL,
    primary_model TEXT NOT NULL, primary_output TEXT NOT NULL, primary_checks TEXT NOT NULL,
    mirror_model TEXT NOT NULL, mirror_output TEXT, mirror_checks TEXT, mirror_error TEXT, created REAL NOT NULL);
"""

WEIGHT_SUFFIXES = (".safetensors", ".bin")
IDENTITY_FILES = ("config.json", "adapter_config.json", "tokenizer.json")


@dataclass(frozen=True)
class RowResult:
    """One model's answer to one suite row, with its scores."""

    row_id: str
    cohort: str
    model_name: str
    model_hash: str
    output: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    score: float  # the lowest of the row's evaluator scores: a row is only as good as its weakest check
    passed: bool  # every evaluator passed
    details: dict[str, Any]  # evaluator → {score, passed, reason}


def folder_hash(*folders: Path | None) -> str:
    """Content hash of the files that define a model (weights, config, tokenizer), over one or more folders."""
    digest = hashlib.sha256()
    for folder in folders:
        if folder is None:
            continue
        provenance = folder / "mergegate.json"
        if provenance.is_file():  # a mergegate merge already hashed its outputs
            outputs = json.loads(provenance.read_text()).get("outputs", {})
            digest.update(json.dumps(sorted(outputs.items())).encode())
            continue
        for file in sorted(folder.iterdir()):
            if file.is_file() and (file.suffix in WEIGHT_SUFFIXES or file.name in IDENTITY_FILES):
                digest.update(file.name.encode())
                with open(file, "rb") as fh:
                    while block := fh.read(1 << 24):
                        digest.update(block)
    return digest.hexdigest()


class Registry:
    """A thin, thread-safe layer over one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: Iterable = ()) -> int:
        with self._lock, self._db:
            return self._db.execute(sql, tuple(params)).lastrowid

    def _read(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # -- models ---------------------------------------------------------------------------------
    def register_model(self, name: str, path: Path, *, role: str, adapter: Path | None = None,
                       lineage: dict | None = None) -> str:
        """Record a model; returns its content hash. Lineage and provenance come from mergegate.json when present."""
        model_hash = folder_hash(path, adapter)
        provenance_file = Path(path) / "mergegate.json"
        provenance = provenance_file.read_text() if provenance_file.is_file() else None
        if lineage is None and provenance:
            record = json.loads(provenance)
            lineage = {"method": record.get("method"), "base_model": record.get("base_model"),
                       "inputs": sorted(record.get("inputs", {}))}
        self._write(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(hash) DO UPDATE SET name=excluded.name, "
            "path=excluded.path, role=excluded.role",
            (model_hash, name, str(path), str(adapter) if adapter else None, role, json.dumps(lineage or {}),
             provenance, time.time()),
        )
        return model_hash

    def model(self, model_hash: str) -> dict | None:
        rows = self._read("SELECT * FROM models WHERE hash=?", (model_hash,))
        return dict(rows[0]) if rows else None

    # -- eval runs ------------------------------------------------------------------------------
    def cached_run(self, model_hash: str, suite_hash: str) -> int | None:
        rows = self._read("SELECT id FROM eval_runs WHERE model_hash=? AND suite_hash=? AND status='finished' "
                          "ORDER BY id DESC LIMIT 1", (model_hash, suite_hash))
        return rows[0]["id"] if rows else None

    def open_run(self, model_hash: str, suite_hash: str) -> int:
        """The unfinished run for this model and suite (to resume), or a new one."""
        rows = self._read("SELECT id FROM eval_runs WHERE model_hash=? AND suite_hash=? AND status='running' "
                          "ORDER BY id DESC LIMIT 1", (model_hash, suite_hash))
        if rows:
            return rows[0]["id"]
        return self._write("INSERT INTO eval_runs (model_hash, suite_hash, status, started) VALUES (?,?,?,?)",
                           (model_hash, suite_hash, "running", time.time()))

    def finish_run(self, run_id: int) -> None:
        self._write("UPDATE eval_runs SET status='finished', finished=? WHERE id=?", (time.time(), run_id))

    def done_rows(self, run_id: int) -> set[str]:
        return {r["row_id"] for r in self._read("SELECT row_id FROM row_results WHERE run_id=?", (run_id,))}

    def add_results(self, run_id: int, results: Iterable[RowResult]) -> None:
        rows = [(run_id, r.row_id, r.cohort, r.model_name, r.model_hash, r.output, r.prompt_tokens,
                 r.completion_tokens, r.latency_ms, r.score, int(r.passed), json.dumps(r.details))
                for r in results]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO row_results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def results(self, run_id: int, model_name: str | None = None) -> list[RowResult]:
        out = []
        for r in self._read("SELECT * FROM row_results WHERE run_id=? ORDER BY rowid", (run_id,)):
            out.append(RowResult(r["row_id"], r["cohort"], model_name or r["model_name"], r["model_hash"],
                                 r["output"], r["prompt_tokens"], r["completion_tokens"], r["latency_ms"],
                                 r["score"], bool(r["passed"]), json.loads(r["details"])))
        return out

    # -- decisions and plan changes -------------------------------------------------------------
    def add_decisions(self, candidate_hash: str, suite_hash: str, policy_hash: str, decisions: Iterable) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO decisions (candidate_hash, suite_hash, policy_hash, cohort, decision, model, numbers, "
                "created) VALUES (?,?,?,?,?,?,?,?)",
                [(candidate_hash, suite_hash, policy_hash, d.cohort, d.decision, d.model,
                  json.dumps(asdict(d), default=float), now) for d in decisions])

    def decisions(self, candidate_hash: str) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM decisions WHERE candidate_hash=? ORDER BY id",
                                            (candidate_hash,))]

    def record_plan_change(self, cohort: str, old_model: str | None, new_model: str, reason: str,
                           actor: str = "admin") -> None:
        self._write("INSERT INTO plan_changes (cohort, old_model, new_model, reason, actor, created) "
                    "VALUES (?,?,?,?,?,?)", (cohort, old_model, new_model, reason, actor, time.time()))

    def plan_changes(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM plan_changes ORDER BY id")]

    def record_mirror(self, request_id: str, cohort: str, primary_model: str, primary_output: str,
                      primary_checks: dict, mirror_model: str, mirror_output: str | None,
                      mirror_checks: dict | None, mirror_error: str | None = None) -> None:
        self._write("INSERT INTO mirror_results (request_id, cohort, primary_model, primary_output, primary_checks, "
                    "mirror_model, mirror_output, mirror_checks, mirror_error, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (request_id, cohort, primary_model, primary_output, json.dumps(primary_checks), mirror_model,
                     mirror_output, json.dumps(mirror_checks) if mirror_checks is not None else None,
                     mirror_error, time.time()))

    def mirror_results(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM mirror_results ORDER BY id")]
