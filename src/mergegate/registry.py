"""The registry: one SQLite file holding models (lineage, provenance), eval runs, row results, gate
decisions and rollout-plan changes.

Eval runs are cached by (model hash, suite hash, config hash): the model hash covers the files on disk that
change an answer (weights, config, generation config, tokenizer files and chat template, adapter), the config
hash everything else that does (generation settings, evaluator versions, the runner's prompt format, library
versions; see `evaluate.local.run_config`). A finished run is served only when it holds a result for every row
of the suite; an interrupted run resumes from the rows it has.

Each row result records when it was stored and by which session (one opening of the registry: one command), so a
report can say when each model's latencies were measured and which were measured together (`measurements`).
A url model's row also keeps the server's own timing of it where the server reports one (`server_ms`, beside
`latency_ms`, the request's wall time); opening a file without that column adds it, NULL for the rows it holds.

Schema versions (`PRAGMA user_version`): 1 had no config hash; opening such a file adds the `config_hash` and
`config` columns, and its old runs (config hash NULL) are kept but never served or resumed. 2 had no measurement
times; opening such a file adds the `session` and `measured` columns, NULL (unknown) for the rows it holds. 3 had
no live tables (`live_*`: the gateway's decisions from live traffic); opening such a file adds them, empty.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import RegistryError
from .io.hashing import folder_hash

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, adapter TEXT, role TEXT NOT NULL,
    lineage TEXT NOT NULL, provenance TEXT, registered REAL NOT NULL);
CREATE TABLE IF NOT EXISTS eval_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model_hash TEXT NOT NULL REFERENCES models(hash),
    suite_hash TEXT NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, finished REAL,
    config_hash TEXT, config TEXT);
CREATE TABLE IF NOT EXISTS row_results (
    run_id INTEGER NOT NULL REFERENCES eval_runs(id), row_id TEXT NOT NULL, cohort TEXT NOT NULL,
    model_name TEXT NOT NULL, model_hash TEXT NOT NULL, output TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, score REAL NOT NULL, passed INTEGER NOT NULL,
    details TEXT NOT NULL, session TEXT, measured REAL, server_ms REAL, PRIMARY KEY (run_id, row_id));
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
CREATE TABLE IF NOT EXISTS live_steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, version INTEGER NOT NULL, cohort TEXT NOT NULL,
    phase_before TEXT NOT NULL, phase_after TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
    reason TEXT NOT NULL, evidence TEXT NOT NULL, plan_before TEXT NOT NULL, plan_after TEXT NOT NULL,
    plan TEXT NOT NULL, created REAL NOT NULL, UNIQUE (experiment, version));
CREATE TABLE IF NOT EXISTS live_state (
    experiment TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (experiment, key));
CREATE TABLE IF NOT EXISTS live_rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, key TEXT NOT NULL, request_id TEXT,
    candidate_score REAL NOT NULL, served_score REAL NOT NULL, sources TEXT NOT NULL, rows INTEGER NOT NULL,
    diff_low REAL NOT NULL, diff_high REAL NOT NULL, promote_e REAL NOT NULL, rollback_e REAL NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS live_requests (
    request_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, cohort TEXT NOT NULL, phase TEXT NOT NULL,
    arm TEXT, model TEXT, plan_version INTEGER NOT NULL, status INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS live_feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS live_drift (
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, model TEXT NOT NULL, cohort TEXT NOT NULL,
    offline_score REAL NOT NULL, rows INTEGER NOT NULL, live_mean REAL NOT NULL, diff_low REAL NOT NULL,
    diff_high REAL NOT NULL, created REAL NOT NULL);
"""
# Created after the migration below: a version-1 file has eval_runs without config_hash until then.
INDEXES = """
CREATE INDEX IF NOT EXISTS eval_runs_key ON eval_runs(model_hash, suite_hash, status);
CREATE INDEX IF NOT EXISTS eval_runs_config ON eval_runs(model_hash, suite_hash, config_hash, status);
"""

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
    # Milliseconds from when the row entered its batch (its prefill) until the generation step that completed its
    # answer (its EOS, or its own token budget), plus its own likelihood pass if it has one (perplexity).
    # Rows share the batch's steps, so it depends on the batch size and the machine: a cost measure (runner format
    # 3 on; earlier runs recorded the whole batch's wall time and are not served; format 4 on, rows enter the batch
    # as others leave it, and a row's time starts when it enters).
    latency_ms: float
    score: float  # the lowest of the row's evaluator scores: a row is only as good as its weakest check
    passed: bool  # every evaluator passed
    details: dict[str, Any]  # evaluator → {score, passed, reason}
    # A url model's row as its server timed it (llama.cpp's `timings`: prompt_ms + predicted_ms): its work on the
    # row without its queue or the network, beside `latency_ms`, the wall time of the request, which has both.
    # None where no timing is reported (vLLM, transformers serve, in process).
    server_ms: float | None = None


@dataclass(frozen=True)
class Measurement:
    """When one run's rows on one cohort were measured: the sessions that stored them (a session is one opening
    of the registry, i.e. one command), the first and last time one was stored, and how many have no record of
    either (stored before the registry kept them). Latencies stored by one session were measured on one machine,
    close in time; rows of another session were measured under another load, perhaps another batch size."""

    rows: int
    sessions: frozenset[str]
    first: float | None  # seconds since the epoch
    last: float | None
    undated: int = 0
    cached: bool = False  # stored before this opening of the registry: read from the cache, not measured now


def measured_together(measurements) -> bool:
    """Whether these measurements (of the models compared on a cohort) were all stored by one session."""
    measurements = list(measurements)
    sessions = frozenset().union(*(m.sessions for m in measurements))
    return len(sessions) == 1 and not any(m.undated for m in measurements)


class Registry:
    """A thin, thread-safe layer over one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.session = uuid.uuid4().hex  # stamps the rows this opening stores (see `measurements`)
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise RegistryError(f"registry {self.path}: is a folder, not an SQLite file")
        # what this opening makes: the file, and the folders made for it (`removed_if_nothing_recorded`)
        self._made = [] if self.path.exists() else [self.path, *(p for p in self.path.parents if not p.exists())]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"registry {self.path}: cannot be opened ({exc})") from None
        self._db.row_factory = sqlite3.Row
        try:
            with self._lock, self._db:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(SCHEMA)
                self._migrate()
                self._db.executescript(INDEXES)
        except sqlite3.Error as exc:
            self._db.close()
            raise RegistryError(f"registry {self.path}: not a usable mergegate registry ({exc})") from None
        except RegistryError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Bring an older file to SCHEMA_VERSION. Version 1 runs have no config hash: kept, never served."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(f"registry {self.path}: schema version {version} is newer than this mergegate "
                                f"understands ({SCHEMA_VERSION})")
        for table, added in (("eval_runs", {"config_hash": "TEXT", "config": "TEXT"}),
                             ("row_results", {"session": "TEXT", "measured": "REAL", "server_ms": "REAL"})):
            columns = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, kind in added.items():
                if column not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if version != SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def removed_if_nothing_recorded(self) -> Iterator[Registry]:
        """This registry for a block that fills it: when the block fails and the file was made by this opening
        and holds nothing, the file (and any folder made for it) is removed, so a failed command leaves no empty
        registry behind. A file that was there before is kept whatever happens."""
        try:
            yield self
        except BaseException:
            if self._made and self._holds_nothing():
                self._remove_made()
            raise

    def _holds_nothing(self) -> bool:
        try:
            tables = [row[0] for row in self._read("SELECT name FROM sqlite_master WHERE type = 'table'", ())]
            return not any(self._read(f'SELECT 1 FROM "{table}" LIMIT 1', ()) for table in tables)
        except sqlite3.Error:  # unreadable now: not known to be empty, so kept
            return False

    def _remove_made(self) -> None:
        self.close()
        file, *folders = self._made
        try:
            for end in ("", "-wal", "-shm", "-journal"):
                file.with_name(file.name + end).unlink(missing_ok=True)
            for folder in folders:  # the deepest first
                folder.rmdir()
        except OSError:  # a folder something else has written into meanwhile: kept
            pass

    def _write(self, sql: str, params: Iterable = ()) -> int | None:
        with self._lock, self._db:
            return self._db.execute(sql, tuple(params)).lastrowid

    def _read(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # -- models ---------------------------------------------------------------------------------
    def register_model(self, name: str, path: Path, *, role: str, adapter: Path | None = None,
                       lineage: dict | None = None, model_hash: str | None = None) -> str:
        """Record a model; returns its content hash (`model_hash` when the caller computed it already, as a search
        trial does where it merged). Lineage and provenance come from mergegate.json when present."""
        model_hash = model_hash or folder_hash(path, adapter)
        provenance_file = Path(path) / "mergegate.json"
        provenance = provenance_file.read_text() if provenance_file.is_file() else None
        if lineage is None and provenance:
            try:
                record = json.loads(provenance)
            except ValueError:
                record = None  # provenance only informs the lineage; the identity comes from the files
            if isinstance(record, dict):
                lineage = {"method": record.get("method"), "base_model": record.get("base_model"),
                           "inputs": sorted(record.get("inputs") or {})}
        self._write(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(hash) DO UPDATE SET name=excluded.name, "
            "path=excluded.path, role=excluded.role",
            (model_hash, name, str(path), str(adapter) if adapter else None, role, json.dumps(lineage or {}),
             provenance, time.time()),
        )
        return model_hash

    def register_remote(self, name: str, url: str, model_hash: str, *, role: str, identity: dict) -> str:
        """Record a model behind a server: `model_hash` from what the server reports (evaluate.endpoint), the
        URL as its path (for display), the reported identity as its provenance."""
        self._write(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(hash) DO UPDATE SET name=excluded.name, "
            "path=excluded.path, role=excluded.role",
            (model_hash, name, url, None, role, json.dumps({}), json.dumps({"endpoint": identity}), time.time()),
        )
        return model_hash

    def model(self, model_hash: str) -> dict | None:
        rows = self._read("SELECT * FROM models WHERE hash=?", (model_hash,))
        return dict(rows[0]) if rows else None

    # -- eval runs ------------------------------------------------------------------------------
    def cached_run(self, model_hash: str, suite_hash: str, config_hash: str, row_ids: Iterable[str]) -> int | None:
        """The latest finished run of this model on this suite with this config that has a result for every
        one of `row_ids`; None when there is none (a run missing rows is never served)."""
        needed = set(row_ids)
        for row in self._read("SELECT id FROM eval_runs WHERE model_hash=? AND suite_hash=? AND config_hash=? "
                              "AND status='finished' ORDER BY id DESC", (model_hash, suite_hash, config_hash)):
            if needed <= self.done_rows(row["id"]):
                return row["id"]
        return None

    def open_run(self, model_hash: str, suite_hash: str, config_hash: str, config: dict | None = None) -> int:
        """The unfinished run for this model, suite and config (to resume), or a new one."""
        rows = self._read("SELECT id FROM eval_runs WHERE model_hash=? AND suite_hash=? AND config_hash=? "
                          "AND status='running' ORDER BY id DESC LIMIT 1", (model_hash, suite_hash, config_hash))
        if rows:
            return rows[0]["id"]
        run_id = self._write("INSERT INTO eval_runs (model_hash, suite_hash, status, started, config_hash, config) "
                             "VALUES (?,?,?,?,?,?)", (model_hash, suite_hash, "running", time.time(), config_hash,
                                                      json.dumps(config or {}, sort_keys=True)))
        assert run_id is not None
        return run_id

    def run_config(self, run_id: int) -> dict:
        rows = self._read("SELECT config FROM eval_runs WHERE id=?", (run_id,))
        return json.loads(rows[0]["config"] or "{}") if rows else {}

    def finish_run(self, run_id: int, row_ids: Iterable[str]) -> None:
        """Mark a run finished; refused unless it holds a result for every one of `row_ids`."""
        missing = sorted(set(row_ids) - self.done_rows(run_id))
        if missing:
            raise RegistryError(f"registry {self.path}: run {run_id} has no result for {len(missing)} row(s) "
                                f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); not finished")
        self._write("UPDATE eval_runs SET status='finished', finished=? WHERE id=?", (time.time(), run_id))

    def done_rows(self, run_id: int) -> set[str]:
        return {r["row_id"] for r in self._read("SELECT row_id FROM row_results WHERE run_id=?", (run_id,))}

    def add_results(self, run_id: int, results: Iterable[RowResult]) -> None:
        """Store results as they are measured, stamped with this session and the time."""
        now = time.time()
        rows = [(run_id, r.row_id, r.cohort, r.model_name, r.model_hash, r.output, r.prompt_tokens,
                 r.completion_tokens, r.latency_ms, r.score, int(r.passed), json.dumps(r.details), self.session, now,
                 r.server_ms)
                for r in results]
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO row_results (run_id, row_id, cohort, model_name, model_hash, output, "
                "prompt_tokens, completion_tokens, latency_ms, score, passed, details, session, measured, server_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def measurements(self, run_id: int) -> dict[str, Measurement]:
        """cohort → when the run's rows there were measured, and by which session(s)."""
        found: dict[str, Measurement] = {}
        for r in self._read("SELECT cohort, session, COUNT(*) AS n, MIN(measured) AS first, MAX(measured) AS last, "
                            "SUM(measured IS NULL OR session IS NULL) AS undated FROM row_results WHERE run_id=? "
                            "GROUP BY cohort, session ORDER BY cohort", (run_id,)):
            before = found.get(r["cohort"], Measurement(0, frozenset(), None, None, cached=True))
            times = [t for t in (before.first, before.last, r["first"], r["last"]) if t is not None]
            found[r["cohort"]] = Measurement(
                before.rows + r["n"], before.sessions | ({r["session"]} if r["session"] is not None else set()),
                min(times) if times else None, max(times) if times else None, before.undated + r["undated"],
                before.cached and r["session"] != self.session)
        return found

    def results(self, run_id: int, model_name: str | None = None) -> list[RowResult]:
        out = []
        for r in self._read("SELECT * FROM row_results WHERE run_id=? ORDER BY rowid", (run_id,)):
            out.append(RowResult(r["row_id"], r["cohort"], model_name or r["model_name"], r["model_hash"],
                                 r["output"], r["prompt_tokens"], r["completion_tokens"], r["latency_ms"],
                                 r["score"], bool(r["passed"]), json.loads(r["details"]), r["server_ms"]))
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

    # -- live traffic (the gateway's live controller: gateway/live.py) --------------------------------------
    def record_live_step(self, experiment: str, version: int, cohort: str, step: dict[str, Any]) -> None:
        """One step of a live experiment: a new plan version, with the evidence it rests on and the plan digests
        before and after (the plan itself kept, so a restart resumes it). `step` holds phase_before, phase_after,
        action, actor, reason, evidence (a dict), plan_before, plan_after (digests) and plan (a dict)."""
        self._write("INSERT INTO live_steps (experiment, version, cohort, phase_before, phase_after, action, actor, "
                    "reason, evidence, plan_before, plan_after, plan, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (experiment, version, cohort, step["phase_before"], step["phase_after"], step["action"],
                     step["actor"], step["reason"], json.dumps(step["evidence"], allow_nan=False),
                     step["plan_before"], step["plan_after"], json.dumps(step["plan"]), time.time()))

    def live_steps(self, experiment: str | None = None) -> list[dict]:
        where, params = ("WHERE experiment=?", (experiment,)) if experiment else ("", ())
        return [dict(r) for r in self._read(f"SELECT * FROM live_steps {where} ORDER BY id", params)]

    def live_experiments(self) -> list[str]:
        """Experiments with a recorded step, the latest started last."""
        return [r["experiment"] for r in self._read(
            "SELECT experiment, MIN(id) AS first FROM live_steps GROUP BY experiment ORDER BY first", ())]

    def save_live_state(self, experiment: str, states: dict[str, str]) -> None:
        """Replace the states of `experiment`'s keys in `states` (key → JSON text), in one transaction."""
        now = time.time()
        with self._lock, self._db:
            self._db.executemany("INSERT INTO live_state (experiment, key, state, updated) VALUES (?,?,?,?) "
                                 "ON CONFLICT(experiment, key) DO UPDATE SET state=excluded.state, "
                                 "updated=excluded.updated", [(experiment, k, v, now) for k, v in states.items()])

    def live_state(self, experiment: str) -> dict[str, str]:
        return {r["key"]: r["state"] for r in self._read("SELECT key, state FROM live_state WHERE experiment=?",
                                                         (experiment,))}

    def record_live_row(self, experiment: str, key: str, request_id: str | None, candidate_score: float,
                        served_score: float, sources: dict, decision) -> None:
        """One scored row of a live test (`key`: the cohort's stage, or a drift stream) and the decision after it."""
        self._write("INSERT INTO live_rows (experiment, key, request_id, candidate_score, served_score, sources, rows, "
                    "diff_low, diff_high, promote_e, rollback_e, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (experiment, key, request_id, candidate_score, served_score, json.dumps(sources), decision.rows,
                     decision.diff_low, decision.diff_high, min(decision.promote_e, 1e300),
                     min(decision.rollback_e, 1e300), time.time()))

    def live_rows(self, experiment: str, key: str | None = None) -> list[dict]:
        where, params = ("AND key=?", (experiment, key)) if key else ("", (experiment,))
        return [dict(r) for r in self._read(f"SELECT * FROM live_rows WHERE experiment=? {where} ORDER BY id", params)]

    def record_live_request(self, request_id: str, experiment: str, cohort: str, phase: str, arm: str | None,
                            model: str | None, plan_version: int, status: int) -> None:
        self._write("INSERT OR REPLACE INTO live_requests (request_id, experiment, cohort, phase, arm, model, "
                    "plan_version, status, created) VALUES (?,?,?,?,?,?,?,?,?)",
                    (request_id, experiment, cohort, phase, arm, model, plan_version, status, time.time()))

    def live_request(self, request_id: str) -> dict | None:
        rows = self._read("SELECT * FROM live_requests WHERE request_id=?", (request_id,))
        return dict(rows[0]) if rows else None

    def live_requests(self, experiment: str) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM live_requests WHERE experiment=? ORDER BY created, rowid",
                                            (experiment,))]

    def record_feedback(self, request_id: str, metric: str, value: float) -> None:
        self._write("INSERT INTO live_feedback (request_id, metric, value, created) VALUES (?,?,?,?)",
                    (request_id, metric, value, time.time()))

    def feedback(self, request_id: str | None = None) -> list[dict]:
        where, params = ("WHERE request_id=?", (request_id,)) if request_id else ("", ())
        return [dict(r) for r in self._read(f"SELECT * FROM live_feedback {where} ORDER BY id", params)]

    def record_drift(self, experiment: str, model: str, cohort: str, offline_score: float, decision) -> None:
        """A served model's live scores on a cohort established below its offline score by more than max_drop."""
        self._write("INSERT INTO live_drift (experiment, model, cohort, offline_score, rows, live_mean, diff_low, "
                    "diff_high, created) VALUES (?,?,?,?,?,?,?,?,?)",
                    (experiment, model, cohort, offline_score, decision.rows, offline_score + decision.diff_mean,
                     decision.diff_low, decision.diff_high, time.time()))

    def drift_events(self, experiment: str | None = None) -> list[dict]:
        where, params = ("WHERE experiment=?", (experiment,)) if experiment else ("", ())
        return [dict(r) for r in self._read(f"SELECT * FROM live_drift {where} ORDER BY id", params)]

    def offline_score(self, cohort: str, model: str, candidate: str) -> float | None:
        """The score the gate measured for `model` on `cohort` (the latest decision recorded for the cohort):
        the candidate's mean when `model` is `candidate`, else the source's or base's mean; None if unknown."""
        for r in self._read("SELECT numbers FROM decisions WHERE cohort=? ORDER BY id DESC", (cohort,)):
            numbers = json.loads(r["numbers"])
            if model == candidate:
                return float(numbers["candidate_mean"])
            if model in (numbers.get("source_means") or {}):
                return float(numbers["source_means"][model])
        return None
