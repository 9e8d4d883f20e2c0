"""The live loop: each held cohort is decided from live traffic, and each decision applied to the gateway's plan.

Per cohort, phases (docs/live.md):

- `shadow`: the cohort's model serves it; its `mirror` share is also sent to the candidate. Both answers of each
  mirrored request are scored (online_scores.py) and the pair updates the cohort's paired test
  (`live.sequential`). Promoted → `canary`; a drop beyond the margin established → `rolled_back`.
- `canary`: the candidate answers `live.canary_share` of the cohort, drawn per request; each arm's online scores
  and posted outcomes (`POST /v1/feedback`) feed a canary test (`CanaryEvidence`). Promoted → `full`.
- `full`: the candidate serves the cohort, falling back to the cohort's source; the mirrored share now goes to
  the source (a reverse shadow) and the paired test runs again. Promoted → `done` (mirroring stops).
- `rolled_back`, `exhausted` (the stage's budget spent without a conclusion), `manual` (an admin changed the
  route): the test ends; the cohort is on its source (on the admin's model for `manual`).

Decisions are read after every scored row, over every cohort under test at once (`family_decisions`: e-Holm,
family-wise error at the policy's confidence). Guardrails (the candidate's error rate, fallback rate and p99
latency on a cohort in its canary or full phase, beyond the policy's `live` bounds) roll back at once. Every
step is a new plan version recorded in the registry (`live_steps`) with its evidence and the plan digests before
and after; the evidence and the phases are saved after every row (`live_state`), so a restart resumes both.
For every served model and cohort whose offline score the registry holds, its live scores are tested against it
(drift): established below by more than max_drop → reported on /metrics and in the registry, and rolled back
when the policy's `live.drift_rollback` asks and the model is the candidate.

Everything that scores, decides or writes runs in one background task, off the request path, in arrival order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..live.sequential import (
    CanaryEvidence,
    CohortEvidence,
    Decision,
    SequentialParams,
    decide,
    family_decisions,
    record_canary,
    start,
    start_canary,
    update,
)
from ..rollout import RolloutPlan, Route
from .admin import PlanStore, authorize
from .bodies import load_json, read_body
from .errors import APIError, validation_error
from .mirror import sampled
from .online_scores import PairwiseJudge, Scorer, scorer_for
from .routing import DEFAULT

if TYPE_CHECKING:
    from ..gate import Policy

log = logging.getLogger("mergegate.gateway.live")

TESTING = ("shadow", "canary", "full")
NEXT_PHASE = {"shadow": "canary", "canary": "full", "full": "done"}
STATE_FORMAT = "mergegate.live.cohort/1"
REMEMBERED_REQUESTS = 100_000  # request ids kept in memory for feedback (older ones are read from the registry)
QUEUE_LIMIT = 10_000  # events waiting to be scored; more are dropped (counted), never queued without bound
LATENCIES_KEPT = 2048  # the candidate's latest latencies per cohort, for the p99 guardrail


def digest(shape: Any) -> str:
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_digest(plan: RolloutPlan) -> str:
    """A hash of the plan's content (its routes and models)."""
    return digest(plan.model_dump(mode="json", exclude_none=True))


def experiment_id(plan: RolloutPlan) -> str:
    """What identifies a live experiment across restarts: the candidate and the models (not the routes, which
    the experiment changes). Another model or candidate is another experiment."""
    return digest(plan.model_dump(mode="json", include={"candidate", "models", "bases"}, exclude_none=True))


@dataclass
class Guard:
    """The candidate's requests on one cohort in the current stage: how many, how many failed or fell over, and
    its latest latencies."""

    calls: int = 0
    errors: int = 0
    fallbacks: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def broken(self, live) -> str | None:
        """Why a guardrail is broken, or None (not before `guardrail_min_requests` requests)."""
        if self.calls < live.guardrail_min_requests:
            return None
        if live.max_error_rate is not None and self.errors / self.calls > live.max_error_rate:
            return f"error rate {self.errors}/{self.calls} above max_error_rate {live.max_error_rate}"
        if live.max_fallback_rate is not None and self.fallbacks / self.calls > live.max_fallback_rate:
            return f"fallback rate {self.fallbacks}/{self.calls} above max_fallback_rate {live.max_fallback_rate}"
        if live.max_p99_ms is not None and self.latencies_ms:
            ranked = sorted(self.latencies_ms)
            p99 = ranked[max(1, math.ceil(0.99 * len(ranked))) - 1]
            if p99 > live.max_p99_ms:
                return f"p99 latency {p99:.0f} ms above max_p99_ms {live.max_p99_ms}"
        return None


@dataclass
class CohortLive:
    """One cohort's live test: its phase, the route it started from, the current stage's evidence."""

    phase: str
    origin: dict  # the cohort's route when the experiment started
    stage: int = 0  # counts the stages (each phase change starts one): an answer counts only in its own stage
    evidence: CohortEvidence | None = None  # shadow and full
    canary: CanaryEvidence | None = None  # canary
    last: dict | None = None  # the latest decision read
    guard: Guard = field(default_factory=Guard)

    def paired(self) -> CohortEvidence | None:
        return self.canary.paired if self.canary is not None else self.evidence

    @property
    def rows(self) -> int:
        """Paired rows of the current stage's test (0 when none runs)."""
        evidence = self.paired()
        return evidence.rows if evidence is not None else 0

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, "phase": self.phase, "origin": self.origin, "stage": self.stage,
                           "evidence": self.evidence.to_json() if self.evidence else None,
                           "canary": self.canary.to_json() if self.canary else None, "last": self.last,
                           "guard": asdict(self.guard)}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CohortLive:
        data = json.loads(text)
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} record")
        return cls(data["phase"], data["origin"], data["stage"],
                   CohortEvidence.from_json(data["evidence"]) if data["evidence"] else None,
                   CanaryEvidence.from_json(data["canary"]) if data["canary"] else None, data["last"],
                   Guard(**data["guard"]))


def route_for(phase: str, origin: Route, candidate: str, canary_share: float) -> Route:
    """The cohort's route in `phase`, from the route it started from."""
    if phase == "canary":
        return origin.model_copy(update={"mirror": 0.0, "canary": canary_share, "decision": "hold"})
    if phase in ("full", "done"):
        fallback = [m for m in dict.fromkeys([origin.model, *origin.fallback]) if m != candidate]
        return origin.model_copy(update={"model": candidate, "fallback": fallback, "canary": None,
                                         "mirror": origin.mirror if phase == "full" else 0.0,
                                         "mirror_to": origin.model if phase == "full" else None,
                                         "decision": "promote"})
    if phase in ("rolled_back", "exhausted"):
        # the source: the route's own model, or where the gate promoted the candidate, its first other model
        source = next((m for m in [origin.model, *origin.fallback] if m != candidate), origin.model)
        fallback = [m for m in dict.fromkeys([origin.model, *origin.fallback]) if m not in (source, candidate)]
        return origin.model_copy(update={"model": source, "fallback": fallback, "mirror": 0.0, "canary": None,
                                         "mirror_to": None, "decision": "reject" if phase == "rolled_back" else "hold"})
    return origin  # shadow


def with_route(plan: RolloutPlan, cohort: str, route: Route) -> RolloutPlan:
    if cohort == DEFAULT:
        return plan.model_copy(update={"default": route})
    return plan.model_copy(update={"routes": {**plan.routes, cohort: route}})


def decision_record(decision: Decision) -> dict:
    """A decision as stored: infinite e-values (a bet that cannot lose) capped so the record stays JSON."""
    record = asdict(decision)
    for key in ("promote_e", "rollback_e"):
        record[key] = min(record[key], 1e300)
    return record


class LiveController:
    """The live loop of one gateway (see the module's docstring). Built with the policy the plan was gated with."""

    def __init__(self, store: PlanStore, registry, policy: Policy, metrics, *, suite=None, clock=time.time):
        self.store, self.registry, self.policy, self.metrics, self.clock = store, registry, policy, metrics, clock
        self.live = policy.live
        self.experiment = experiment_id(store.plan)
        self.version = 0
        self.cohorts: dict[str, CohortLive] = {}
        self.drift: dict[tuple[str, str], CohortEvidence] = {}
        self.drifted: set[tuple[str, str]] = set()
        self._offline: dict[tuple[str, str], float | None] = {}
        self._requests: OrderedDict[str, dict] = OrderedDict()
        self._rows = {c: (suite.by_cohort(c) if suite is not None else None) for c in self._cohort_names(store.plan)}
        self.judge = PairwiseJudge(self.live.judge) if self.live.judge is not None else None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.dropped = self.pending = 0
        self._resume_or_begin()
        self.steps = metrics.counter("mergegate_live_steps_total", "Live plan steps, by cohort and action.",
                                     ("cohort", "action"))
        metrics.gauge("mergegate_live_plan_version", "The live plan's version (one per step).", (),
                      collect=lambda: {(): self.version})
        metrics.gauge("mergegate_live_rows", "Rows of each cohort's current live test, by phase.",
                      ("cohort", "phase"),
                      collect=lambda: {(c, s.phase): s.rows for c, s in self.cohorts.items()})
        metrics.gauge("mergegate_live_drift", "1 where a served model's live scores on a cohort are established "
                      "below its offline score by more than max_drop, else 0.", ("model", "cohort"),
                      collect=lambda: {key: float(key in self.drifted) for key in self.drift})

    # -- set-up and restart --------------------------------------------------------------------------------------
    @staticmethod
    def _cohort_names(plan: RolloutPlan) -> list[str]:
        return [*plan.routes, DEFAULT]

    def _resume_or_begin(self) -> None:
        steps = self.registry.live_steps(self.experiment)
        if steps:
            last = steps[-1]
            self.store.plan = RolloutPlan.model_validate(json.loads(last["plan"]))
            self.version = last["version"]
            for key, text in self.registry.live_state(self.experiment).items():
                kind, _, name = key.partition(":")
                if kind == "cohort":
                    self.cohorts[name] = CohortLive.from_json(text)
                elif kind == "drift":
                    model, _, cohort = name.partition(":")
                    state = json.loads(text)
                    self.drift[(model, cohort)] = CohortEvidence.from_json(state["evidence"])
                    if state["drifted"]:
                        self.drifted.add((model, cohort))
            log.info("live experiment %s resumed at plan version %d", self.experiment, self.version)
            return
        plan = self.store.plan
        for cohort in self._cohort_names(plan):
            route = plan.route(cohort)
            if route.model != plan.candidate and route.mirror > 0 and route.strategy is None:
                phase = "shadow"
            else:
                phase = "done" if route.model == plan.candidate else "off"
            state = CohortLive(phase, route.model_dump(mode="json", exclude_none=True))
            if phase == "shadow":
                state.evidence = start(self.params(cohort), started_at=self.clock())
            self.cohorts[cohort] = state
        digest_now = plan_digest(plan)
        self.registry.record_live_step(self.experiment, 0, "*", {
            "phase_before": "-", "phase_after": "-", "action": "start", "actor": "gateway",
            "reason": "the plan as loaded: " + ", ".join(f"{c} {s.phase}" for c, s in self.cohorts.items()),
            "evidence": {}, "plan_before": digest_now, "plan_after": digest_now, "plan": plan.model_dump(mode="json")})
        self._save_states(list(self.cohorts))

    def params(self, cohort: str, *, budget: bool = True) -> SequentialParams:
        rule_cohort = self.policy.default_route if cohort == DEFAULT and self.policy.default_route else cohort
        max_drop = self.policy.rule(rule_cohort).max_drop
        harm = self.live.harm_margin
        return SequentialParams(max_drop=max_drop, confidence=self.policy.confidence,
                                harm_margin=None if harm is None else max(harm, max_drop),
                                max_rows=self.live.max_rows if budget else None,
                                max_seconds=self.live.max_seconds if budget else None)

    def scorer(self, cohort: str) -> Scorer:
        return scorer_for(cohort, self.store.plan.route(cohort), self.live, self._rows.get(cohort))

    # -- the background task -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue(QUEUE_LIMIT)
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            await self.drain(timeout=5.0)
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait (bounded) until every event so far is scored and applied."""
        if self._queue is not None:
            await asyncio.wait_for(self._queue.join(), timeout)

    @property
    def idle(self) -> bool:
        """Whether every event so far has been scored and applied (for a caller on another thread)."""
        return self.pending == 0

    def _submit(self, event: tuple) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
        else:
            self.pending += 1

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            try:
                await getattr(self, f"_on_{event[0]}")(*event[1:])
            except Exception:  # one bad event must not end the loop
                log.exception("live: scoring or applying %s failed", event[0])
            finally:
                self.pending -= 1
                self._queue.task_done()

    # -- entry points (called on the event loop, never blocking) ---------------------------------------------------
    def on_pair(self, target, request_id: str, request, primary_model: str, primary_text: str, mirror_model: str,
                mirror_text: str) -> None:
        """A mirrored request's two answers (mirror.py)."""
        state = self.cohorts.get(target.cohort)
        if state is not None and state.phase in ("shadow", "full"):
            self._submit(("pair", target.cohort, state.stage, request_id, request.routing_text(),
                          {primary_model: primary_text, mirror_model: mirror_text}))

    def observe(self, target, request_id: str, plan_version: int, outcome: dict, seconds: float) -> None:
        """A routed request ended (api.py): who answered it, with what, how fast."""
        state = self.cohorts.get(target.cohort)
        if state is None or target.pinned:
            return
        info = {"cohort": target.cohort, "phase": state.phase, "stage": state.stage, "arm": target.arm,
                "model": outcome.get("model"), "plan_version": plan_version}
        self._requests[request_id] = info
        while len(self._requests) > REMEMBERED_REQUESTS:
            self._requests.popitem(last=False)
        self._submit(("request", target, request_id, info, outcome.get("status", 500), outcome.get("text"),
                      list(outcome.get("skipped", ())), seconds * 1000))

    async def feedback(self, request_id: str, metric: str, value: float) -> dict:
        """An outcome posted for an answered request: recorded, and counted for its arm in a running canary."""
        info = self._requests.get(request_id)
        if info is None:
            row = await asyncio.to_thread(self.registry.live_request, request_id)
            if row is None or row["experiment"] != self.experiment:
                raise APIError(404, f"No answered request has the id '{request_id}' on this gateway.",
                               param="request_id", code="request_not_found")
            info = {**row, "stage": -1}
        await asyncio.to_thread(self.registry.record_feedback, request_id, metric, value)
        state = self.cohorts.get(info["cohort"])
        counted = bool(state is not None and state.phase == "canary" and info["stage"] == state.stage
                       and info["arm"] in ("candidate", "served"))
        if counted:
            self._submit(("feedback", info["cohort"], info["stage"], info["arm"], value))
        return {"request_id": request_id, "metric": metric, "value": value, "cohort": info["cohort"],
                "arm": info["arm"], "counted": counted}

    async def override(self, cohort: str, action: str, reason: str, actor: str) -> dict:
        """An admin's decision on a cohort under test: "promote" (its next phase) or "rollback"."""
        state = self.cohorts.get(cohort)
        if state is None or state.phase not in TESTING:
            raise APIError(409, f"Cohort '{cohort}' is not under a live test (phase "
                                f"{state.phase if state else 'none'}).", param="cohort", code="not_under_test")
        phase = NEXT_PHASE[state.phase] if action == "promote" else "rolled_back"
        await self._step(cohort, phase, action=f"manual_{action}", actor=actor, reason=reason)
        return {"cohort": cohort, "phase": phase, "version": self.version}

    async def manual_route(self, cohort: str, before: RolloutPlan, actor: str, reason: str) -> None:
        """An admin pointed a cohort's route at a model (admin.py): the live test there ends, recorded as a step."""
        state = self.cohorts.get(cohort)
        if state is None:
            return
        phase_before, state.phase = state.phase, "manual"
        await self._record(cohort, phase_before, "manual", "manual_route", actor, reason, before, state)

    # -- handlers (the background task) ----------------------------------------------------------------------------
    async def _on_pair(self, cohort: str, stage: int, request_id: str, prompt: str, answers: dict) -> None:
        state, candidate = self.cohorts[cohort], self.store.plan.candidate
        if state.stage != stage or state.phase not in ("shadow", "full") or candidate not in answers:
            return
        served_model = next(m for m in answers if m != candidate)
        scorer = self.scorer(cohort)
        c, c_sources = scorer.score(answers[candidate], None)
        s, s_sources = scorer.score(answers[served_model], None)
        sources: dict[str, Any] = {"candidate": c_sources, "served": s_sources, "served_model": served_model}
        if self.judge is not None:
            try:
                p = await asyncio.to_thread(self.judge.preference, prompt, answers[candidate], answers[served_model])
            except Exception as exc:  # noqa: BLE001 — a judge that cannot be asked leaves this row to the checks
                sources["judge_error"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                sources["judge"] = p
                c, s = min(c if c is not None else 1.0, p), min(s if s is not None else 1.0, 1.0 - p)
        if c is None or s is None:
            return
        assert state.evidence is not None
        state.evidence = update(state.evidence, c, s)
        await self._row(cohort, state, request_id, c, s, sources)

    async def _on_request(self, target, request_id: str, info: dict, status: int, text: str | None,
                          skipped: list, latency_ms: float) -> None:
        cohort, candidate = target.cohort, self.store.plan.candidate
        await asyncio.to_thread(self.registry.record_live_request, request_id, self.experiment, cohort,
                                info["phase"], info["arm"], info["model"] if status < 400 else None,
                                info["plan_version"], status)
        state = self.cohorts[cohort]
        current = state.stage == info["stage"]
        candidate_first = bool(target.chain) and target.chain[0] == candidate
        if current and state.phase in ("canary", "full") and candidate_first:
            guard = state.guard
            guard.calls += 1
            guard.errors += status >= 500 or any(m == candidate and not r.startswith("check:") for m, r in skipped)
            guard.fallbacks += info["model"] != candidate
            if info["model"] == candidate:
                guard.latencies_ms = [*guard.latencies_ms, latency_ms][-LATENCIES_KEPT:]
            broken = guard.broken(self.live)
            if broken:
                await self._step(cohort, "rolled_back", action="guardrail", actor="gateway", reason=broken)
                return
        if text is None or status >= 400 or info["model"] is None:
            return
        scorer = self.scorer(cohort)
        score, sources = scorer.score(text, latency_ms)
        if score is None:
            return
        failed = _failed_scored_check(scorer, target.route, candidate, skipped) if candidate_first else None
        if current and failed is not None and info["model"] != candidate:
            await self._on_candidate_failed(target, state, request_id, info, failed, score, sources)
        elif current and state.phase == "canary" and info["arm"] in ("candidate", "served") and state.canary:
            state.canary = record_canary(state.canary, info["arm"], score)
            await self._row(cohort, state, request_id, score if info["arm"] == "candidate" else math.nan,
                            score if info["arm"] == "served" else math.nan, {info["arm"]: sources})
        await self._drift(info["model"], cohort, score)

    async def _on_candidate_failed(self, target, state: CohortLive, request_id: str, info: dict, check: str,
                                   score: float, sources: dict) -> None:
        """The candidate's own answer failed the route's check (a score source) and another model answered: the
        candidate scores that check's 0 for this request, never the answer that stood in for its own. In a canary
        it is the candidate arm's score; in a full phase, on a request the reverse shadow samples (which mirrors
        nothing here: the source already answered), it pairs with the source's answer."""
        failed = {check: 0.0, "fell_back_to": info["model"]}
        if state.phase == "canary" and info["arm"] == "candidate" and state.canary is not None:
            state.canary = record_canary(state.canary, "candidate", 0.0)
            await self._row(target.cohort, state, request_id, 0.0, math.nan, {"candidate": failed})
        elif state.phase == "full" and state.evidence is not None and info["model"] == target.route.mirror_to \
                and sampled(request_id, target.route.mirror):
            state.evidence = update(state.evidence, 0.0, score)
            await self._row(target.cohort, state, request_id, 0.0, score,
                            {"candidate": failed, "served": sources, "served_model": info["model"]})

    async def _on_feedback(self, cohort: str, stage: int, arm: str, value: float) -> None:
        state = self.cohorts[cohort]
        if state.stage != stage or state.phase != "canary" or state.canary is None:
            return
        state.canary = record_canary(state.canary, arm, value)  # type: ignore[arg-type]
        await self._row(cohort, state, None, value if arm == "candidate" else math.nan,
                        value if arm == "served" else math.nan, {arm: {"feedback": value}})

    async def _row(self, cohort: str, state: CohortLive, request_id: str | None, c: float, s: float,
                   sources: dict) -> None:
        """A row was added to `cohort`'s evidence: record it, decide over the family, apply what concluded."""
        decisions = self._decisions()
        decision = decisions[cohort]
        state.last = decision_record(decision)
        await asyncio.to_thread(self.registry.record_live_row, self.experiment, f"{cohort}:{state.phase}",
                                request_id, -1.0 if math.isnan(c) else c, -1.0 if math.isnan(s) else s, sources,
                                decision)
        await asyncio.to_thread(self._save_states, [cohort])
        for name, d in decisions.items():
            await self._apply(name, d)

    def _decisions(self) -> dict[str, Decision]:
        """Every cohort under test, decided together (rowless ones included: leaving one out would raise the
        others' chance of a false conclusion)."""
        testing = {c: s for c, s in self.cohorts.items() if s.phase in TESTING and s.paired() is not None}
        evidences = {c: s.paired() for c, s in testing.items()}
        return family_decisions(evidences, {c: self.params(c) for c in testing}, now=self.clock())  # type: ignore[arg-type]

    async def _apply(self, cohort: str, decision: Decision) -> None:
        state = self.cohorts[cohort]
        if state.phase not in TESTING or decision.outcome == "inconclusive":
            return
        if decision.outcome == "promote":
            phase = NEXT_PHASE[state.phase]
        elif decision.outcome == "rollback":
            phase = "rolled_back"
        else:  # the budget is spent: a canary or shadow stays on its source; a full phase keeps the candidate
            phase = "done" if state.phase == "full" else "exhausted"
        await self._step(cohort, phase, action=decision.outcome, actor="gateway", reason=decision.reason,
                         decision=decision)

    async def _drift(self, model: str, cohort: str, score: float) -> None:
        key = (model, cohort)
        if key not in self._offline:
            self._offline[key] = await asyncio.to_thread(self.registry.offline_score, cohort, model,
                                                         self.store.plan.candidate)
        offline = self._offline[key]
        if offline is None:
            return
        params = self.params(cohort, budget=False)
        evidence = update(self.drift.get(key) or start(params), score, offline)
        self.drift[key] = evidence
        decision = decide(evidence, params)
        fresh = decision.outcome == "rollback" and key not in self.drifted
        if fresh:
            self.drifted.add(key)
            await asyncio.to_thread(self.registry.record_drift, self.experiment, model, cohort, offline, decision)
        await asyncio.to_thread(self.registry.save_live_state, self.experiment, {
            f"drift:{model}:{cohort}": json.dumps({"evidence": evidence.to_json(), "drifted": key in self.drifted,
                                                   "offline": offline})})
        state = self.cohorts[cohort]
        if fresh and self.live.drift_rollback and model == self.store.plan.candidate and \
                state.phase in ("canary", "full", "done"):
            await self._step(cohort, "rolled_back", action="drift", actor="gateway",
                             reason=f"{model}'s live scores are established below its offline score {offline:.3f} "
                                    f"by more than max_drop: {decision.reason}", decision=decision)

    # -- steps ------------------------------------------------------------------------------------------------------
    async def _step(self, cohort: str, phase: str, *, action: str, actor: str, reason: str,
                    decision: Decision | None = None) -> None:
        """Move `cohort` to `phase`: a new plan version, applied at once, then recorded with its evidence."""
        state, before = self.cohorts[cohort], self.store.plan
        route = route_for(phase, Route.model_validate(state.origin), before.candidate, self.live.canary_share)
        phase_before = state.phase
        await self.store.replace(with_route(before, cohort, route))
        if decision is not None:
            state.last = decision_record(decision)
        state.phase, state.stage, state.guard = phase, state.stage + 1, Guard()
        state.evidence = start(self.params(cohort), started_at=self.clock()) if phase in ("shadow", "full") else None
        state.canary = start_canary(self.params(cohort), started_at=self.clock()) if phase == "canary" else None
        await self._record(cohort, phase_before, phase, action, actor, reason, before, state)

    async def _record(self, cohort: str, phase_before: str, phase: str, action: str, actor: str, reason: str,
                      before: RolloutPlan, state: CohortLive) -> None:
        self.version += 1
        after = self.store.plan
        evidence = {"decision": state.last, "sources": _sources(self.scorer(cohort), self.judge is not None)}
        await asyncio.to_thread(self.registry.record_live_step, self.experiment, self.version, cohort, {
            "phase_before": phase_before, "phase_after": phase, "action": action, "actor": actor, "reason": reason,
            "evidence": evidence, "plan_before": plan_digest(before), "plan_after": plan_digest(after),
            "plan": after.model_dump(mode="json")})
        await asyncio.to_thread(self._save_states, [cohort])
        self.steps.inc(cohort, action)
        log.info("live: %s %s → %s (%s, plan version %d): %s", cohort, phase_before, phase, action, self.version,
                 reason)

    def _save_states(self, cohorts: list[str]) -> None:
        self.registry.save_live_state(self.experiment, {f"cohort:{c}": self.cohorts[c].to_json() for c in cohorts})


def _failed_scored_check(scorer: Scorer, route: Route, candidate: str, skipped: list) -> str | None:
    """The route's check the candidate's answer failed (it was skipped for it), when that check is one of the
    scorer's sources — its failure then scores 0 — else None."""
    scored = {"json_valid": scorer.json or scorer.schema_row is not None, "tool_selection": scorer.tools is not None}
    check = route.check
    if check is None or not scored.get(check):
        return None
    return check if (candidate, f"check:{check}") in {tuple(s) for s in skipped} else None


def _sources(scorer: Scorer, judged: bool) -> list[str]:
    """The names of the scores' sources for a cohort."""
    names = []
    if scorer.schema_row is not None:
        names.append("json_schema")
    elif scorer.json:
        names.append("json_valid")
    names += ["tool_selection"] * (scorer.tools is not None) + ["refusal"] * scorer.must_refuse
    names += ["length"] * (scorer.max_chars is not None) + ["latency"] * (scorer.max_latency_ms is not None)
    return names + ["pairwise_judge"] * judged


# -- HTTP: POST /v1/feedback, POST /admin/live/{cohort}, GET /admin/live ----------------------------------------------

router = APIRouter()


class Feedback(BaseModel):
    """`POST /v1/feedback`: an outcome for an answered request (its `id`, also sent as `x-request-id`)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=256, strict=True)
    metric: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$", strict=True)
    value: Any  # a boolean or a number in [0, 1] (checked by parse_feedback, naming the field)


def parse_feedback(raw: bytes) -> Feedback:
    """The body as a Feedback, or an APIError (400) naming the parameter; never anything else, whatever the bytes.
    A value must be a boolean or a number in [0, 1]."""
    data = load_json(raw or b"null")
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object with 'request_id', 'metric' and 'value'.",
                       code="invalid_value")
    try:
        body = Feedback.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    value = body.value
    if not isinstance(value, bool) and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):  # not NaN
        raise APIError(400, f"Invalid value for 'value': {value!r} is not a boolean or a number in [0, 1].",
                       param="value", code="invalid_value")
    return body


def _controller(request: Request) -> LiveController:
    live = request.app.state.gateway.live
    if live is None:
        raise APIError(404, "This gateway runs no live tests: start it with a policy (--policy).",
                       code="live_disabled")
    return live


@router.post("/v1/feedback")
async def post_feedback(request: Request) -> dict:
    gateway = request.app.state.gateway
    body = parse_feedback(await read_body(request, gateway.config.max_admin_body_bytes))
    return await _controller(request).feedback(body.request_id, body.metric, float(body.value))


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(pattern=r"^(promote|rollback)$", strict=True)
    reason: str = Field(min_length=1, max_length=4096, strict=True)
    actor: str = Field("admin", max_length=256, strict=True)


@router.get("/admin/live")
async def get_live(request: Request) -> dict:
    authorize(request)
    live = _controller(request)
    return {"experiment": live.experiment, "version": live.version,
            "cohorts": {c: {"phase": s.phase, "rows": s.rows, "last": s.last}
                        for c, s in live.cohorts.items()},
            "drifted": [{"model": m, "cohort": c} for m, c in sorted(live.drifted)]}


@router.post("/admin/live/{cohort}")
async def post_override(cohort: str, request: Request) -> dict:
    authorize(request)
    live = _controller(request)
    data = load_json(await read_body(request, request.app.state.gateway.config.max_admin_body_bytes) or b"null")
    try:
        body = Override.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if not body.reason.strip():
        raise APIError(400, "An override needs a non-empty 'reason'.", param="reason", code="invalid_value")
    return await live.override(cohort, body.action, body.reason.strip(), body.actor)
