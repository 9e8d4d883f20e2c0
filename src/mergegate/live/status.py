"""What a person reads of a live experiment, from what the gateway recorded (the registry's `live_*` rows, passed in
as plain records so this module reads no file): per cohort its phase, the current test's rows, interval and
e-values, its last decision and plan version, and drift; and the evidence over time."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class CohortStatus:
    cohort: str
    phase: str
    rows: int
    interval: str  # "[low, high]" of E[candidate − served], or "-" before any row
    promote_e: str  # the promotion bet's e-value / what it needs
    rollback_e: str
    last_decision: str
    plan_version: int  # the latest plan version that changed this cohort (0: as loaded)
    drift: str  # the models whose live scores drifted below their offline score here, or "-"

    HEADER = ("cohort", "phase", "rows", "interval", "promote e", "rollback e", "last decision", "plan version",
              "drift")

    def cells(self) -> tuple[str, ...]:
        return (self.cohort, self.phase, str(self.rows), self.interval, self.promote_e, self.rollback_e,
                self.last_decision, str(self.plan_version), self.drift)


def _e(value: float, needed: float) -> str:
    shown = "inf" if value >= 1e300 else f"{value:.3g}"
    return f"{shown} / {needed:g}"


def _rows(state: dict) -> int:
    """The current test's paired rows: a canary's pairs, else the shadow's or full phase's rows (0: no test)."""
    if state.get("canary"):
        return json.loads(state["canary"])["paired"]["rows"]
    if state.get("evidence"):
        return json.loads(state["evidence"])["rows"]
    return 0


def cohort_statuses(steps: list[dict], states: dict[str, str], drift_events: list[dict]) -> list[CohortStatus]:
    """One status per cohort of the experiment whose `steps` (live_steps rows), `states` (live_state: key → JSON)
    and `drift_events` (live_drift rows) are given."""
    versions: dict[str, int] = {}
    for step in steps:
        versions[step["cohort"]] = step["version"]
    drifted: dict[str, list[str]] = {}
    for event in drift_events:
        drifted.setdefault(event["cohort"], []).append(event["model"])
    found = []
    for key, text in sorted(states.items()):
        kind, _, cohort = key.partition(":")
        if kind != "cohort":
            continue
        state = json.loads(text)
        last = state.get("last") or None
        found.append(CohortStatus(
            cohort, state["phase"], _rows(state),
            f"[{last['diff_low']:+.3f}, {last['diff_high']:+.3f}]" if last else "-",
            _e(last["promote_e"], last["promote_threshold"]) if last else "-",
            _e(last["rollback_e"], last["rollback_threshold"]) if last else "-",
            f"{last['outcome']} after {last['rows']} row(s)" if last else "-",
            versions.get(cohort, 0), ", ".join(sorted(set(drifted.get(cohort, [])))) or "-"))
    return found


def evidence_over_time(rows: list[dict]) -> list[tuple[str, ...]]:
    """The recorded rows of every test (live_rows), as table cells: stage, rows, interval, e-values, sources."""
    return [(row["key"], str(row["rows"]), f"[{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]",
             f"{row['promote_e']:.3g}", f"{row['rollback_e']:.3g}", row["sources"]) for row in rows]
