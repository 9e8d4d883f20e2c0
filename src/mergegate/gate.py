"""The gate: per cohort, promote the candidate, hold the cohort on a source, or reject the candidate there.

Judged on paired per-row differences against the best source on that cohort (every model answered the
same rows), with a seeded bootstrap confidence interval — never on an aggregate mean, which is only
reported beside. The rules are a non-inferiority test plus optional cost bounds (the exact rule, with its
minimum-evidence and rounding clauses, is in `decide`'s docstring):

- promote: at least `min_rows` rows, candidate mean ≥ `min_score`, retention (candidate / best source)
  ≥ `min_retention`, the interval's lower bound of (candidate − best) ≥ −`max_drop`, and every cost bound the
  rule sets is met (`max_p99_ms` on the candidate's p99 per-row latency, `max_tokens_ratio` on its mean
  completion tokens over the best source's).
- reject: at least `min_rows` rows and either the interval's upper bound of (candidate − best) < −`max_drop`
  (a regression beyond the allowed drop is established) or the upper bound of the candidate's own mean's
  interval (the same resamples) < `min_score` (a score below the floor is established). The cohort stays on
  its fallback and the candidate is not even mirrored there.
- hold: anything else (too few rows, not shown non-inferior but no regression established, a score below
  `min_score` not established, a cost bound broken): the cohort stays on its fallback, and a share of its
  traffic is mirrored to the candidate to gather evidence.

A held or rejected cohort is served by its fallback and falls over along a chain ranked by score: the
policy's `fallback` if set, then every other model, sources and base alike, by descending mean on the cohort.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._yaml import load_yaml_model, validate
from .addresses import check_url
from .costs import cohort_costs
from .errors import MergegateError, PolicyError
from .registry import RowResult

# Strict: a number must be a number (no "0.5" strings, no booleans), an integer an integer; nothing infinite.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CohortRule(BaseModel):
    model_config = _STRICT
    min_score: float = Field(default=0.0, ge=0, le=1)
    max_drop: float = Field(default=0.05, ge=0, le=1)
    min_retention: float = Field(default=0.9, ge=0, le=1)
    fallback: str | None = Field(default=None, min_length=1)  # a source to hold on; default: the best source on the cohort
    mirror_share: float = Field(default=0.1, ge=0, le=1)
    min_rows: int = Field(default=20, ge=1, le=1_000_000)  # fewer rows than this: hold, whatever the interval says
    # cost bounds (None: no bound); breaking one holds the cohort
    max_p99_ms: float | None = Field(default=None, gt=0)  # the candidate's p99 per-row latency on the cohort
    max_tokens_ratio: float | None = Field(default=None, gt=0)  # its mean completion tokens / the best source's


class JudgeSettings(BaseModel):
    """A pairwise judge for live shadow traffic: an OpenAI-compatible endpoint asked which of two answers is better,
    in both orders. The API key is read from the environment variable `api_key_env` names (never from the policy)."""

    model_config = _STRICT
    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("base_url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        return check_url(value)  # AddressError is a ValueError: the field is named with it


class LivePolicy(BaseModel):
    """How the gateway decides each held cohort from live traffic (docs/live.md). The test's margins are the
    cohort rule's `max_drop` and the policy's `confidence`; these fields bound the experiment and its guardrails."""

    model_config = _STRICT
    canary_share: float = Field(default=0.1, gt=0, le=1)  # share of a cohort the candidate serves in its canary
    max_rows: int | None = Field(default=2000, ge=1, le=10_000_000)  # rows a stage may gather; then it ends
    max_seconds: float | None = Field(default=None, gt=0)  # seconds a stage may run; then it ends
    harm_margin: float | None = Field(default=None, ge=0, lt=1)  # roll back beyond this drop (None: max_drop)
    # guardrails, over the candidate's requests on a cohort in its canary or full phase: broken → roll back at once
    guardrail_min_requests: int = Field(default=20, ge=1, le=1_000_000)  # fewer requests: not judged yet
    max_error_rate: float | None = Field(default=0.2, ge=0, le=1)  # failed calls of the candidate / its calls
    max_fallback_rate: float | None = Field(default=0.5, ge=0, le=1)  # its requests another model answered
    max_p99_ms: float | None = Field(default=None, gt=0)  # p99 of its answers' latency
    # reference-free scores of live answers
    must_refuse: list[str] = []  # cohorts whose every request must be refused (scored by the refusal check)
    max_answer_chars: int | None = Field(default=None, ge=1)  # a longer answer scores 0
    max_latency_ms: float | None = Field(default=None, gt=0)  # a slower answer scores 0
    judge: JudgeSettings | None = None  # a pairwise judge for shadow pairs (None: none)
    # drift: a served model's live scores established below its offline score by more than max_drop
    drift_rollback: bool = False  # also roll the cohort back to its source when the drifting model is the candidate


# Rule fields added after policies were hashed: left out of the hash while unset (see Policy.sha256).
_HASHED_WHEN_SET = ("max_p99_ms", "max_tokens_ratio")


class Policy(BaseModel):
    """The gate's rules: interval settings, a default rule per cohort and per-cohort overrides.

    `default_route` names the cohort whose decision the rollout plan's default route (requests no cohort
    claims) follows: its model, fallback chain, mirrored share and online check. When it is absent the default
    route is the base model, with no fallback and no mirroring.
    """

    model_config = _STRICT
    confidence: float = Field(default=0.95, ge=0.5, le=0.999)
    bootstrap: int = Field(default=2000, ge=100, le=100_000)  # resamples; bounded so a typo cannot hang the gate
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    default: CohortRule = CohortRule()
    cohorts: dict[str, CohortRule] = {}
    default_route: str | None = Field(default=None, min_length=1)  # a cohort of the suite; None: the base model
    live: LivePolicy = LivePolicy()  # deciding from live traffic (the gateway; docs/live.md)

    def rule(self, cohort: str) -> CohortRule:
        if cohort not in self.cohorts:
            return self.default
        # a cohort's rule overrides only the fields it sets
        return self.default.model_copy(update=self.cohorts[cohort].model_dump(exclude_unset=True))

    def check_cohorts(self, cohorts) -> None:
        """Refuse a policy that names a cohort the suite does not have (a typo would silently drop its rule)."""
        known = list(dict.fromkeys(cohorts))
        unknown = [name for name in self.cohorts if name not in known]
        if unknown:
            raise PolicyError(f"policy: cohort(s) {', '.join(repr(c) for c in unknown)} not in the suite "
                              f"(the suite's cohorts: {', '.join(known)})")
        if self.default_route is not None and self.default_route not in known:
            raise PolicyError(f"policy: default_route {self.default_route!r} is not a cohort of the suite "
                              f"(the suite's cohorts: {', '.join(known)})")
        unknown = [name for name in self.live.must_refuse if name not in known]
        if unknown:
            raise PolicyError(f"policy: live.must_refuse names cohort(s) {', '.join(repr(c) for c in unknown)} not in "
                              f"the suite (the suite's cohorts: {', '.join(known)})")

    def for_cohorts(self, cohorts: Iterable[str]) -> Policy:
        """The rules for `cohorts` alone: the other cohorts' overrides left out, and the default route kept only
        when it is one of them. What `decide` needs for results on some cohorts (a search trial cut short, one
        cohort's as it finishes, the rows a server can answer); each kept rule judges as before."""
        kept = set(cohorts)
        return self.model_copy(update={
            "cohorts": {name: rule for name, rule in self.cohorts.items() if name in kept},
            "default_route": self.default_route if self.default_route in kept else None})

    @property
    def sha256(self) -> str:
        # default_route and the cost bounds left out while unset, so a policy that does not use them keeps the
        # hash recorded beside its earlier decisions
        unset = {"default_route"} if self.default_route is None else set()
        if self.live == LivePolicy():  # added after policies were hashed: left out while it is the default
            unset.add("live")
        fields = self.model_dump(exclude=unset or None)
        for rule in [fields["default"], *fields["cohorts"].values()]:
            for name in _HASHED_WHEN_SET:
                if rule[name] is None:
                    del rule[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def load_policy(source: str | Path | dict | Policy | None) -> Policy:
    """A Policy from a YAML file, a dict, or defaults (None). Raises PolicyError naming the file and the line
    (YAML syntax, tags) or the field (unknown keys, wrong types, values out of range); never another exception."""
    if source is None:
        return Policy()
    if isinstance(source, Policy):
        return source
    if isinstance(source, dict):
        return validate(Policy, source, "policy", PolicyError)
    path = Path(source)
    return load_yaml_model(path, Policy, where=f"policy {path}", what=f"policy fields ({', '.join(Policy.model_fields)})",
                           error_cls=PolicyError, empty={})  # an empty file: the default rules


Decision = Literal["promote", "hold", "reject"]


@dataclass(frozen=True)
class CohortDecision:
    cohort: str
    decision: Decision
    model: str  # where the cohort's traffic goes
    rows: int
    candidate_mean: float
    best_source: str
    best_source_mean: float
    base_mean: float
    diff_mean: float  # candidate − best source, paired
    diff_low: float
    diff_high: float
    retention: float
    retention_low: float
    retention_high: float
    source_means: dict[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    mirror_share: float = 0.0
    fallback: tuple[str, ...] = ()  # where the route falls over after `model`, in order
    candidate_low: float = 0.0  # the bootstrap interval of the candidate's mean (the same resamples as diff_*)
    candidate_high: float = 0.0
    drop_established: bool = False  # the whole interval of (candidate − best source) is below zero
    within_max_drop: bool = False  # the interval's lower bound is at or above −max_drop (non-inferior)

    @property
    def tolerated_drop(self) -> bool:
        """A drop the gate let through: established, yet within max_drop, and the cohort not rejected (promoted,
        or held for another reason)."""
        return self.decision != "reject" and self.drop_established and self.within_max_drop


@dataclass(frozen=True)
class GateResult:
    candidate: str
    decisions: list[CohortDecision]
    aggregate: dict[str, float]  # overall mean per model: reported, never decisive
    policy_sha256: str

    def decision(self, cohort: str) -> CohortDecision:
        return next(d for d in self.decisions if d.cohort == cohort)


def _q(value: Any) -> float:
    """A compared quantity at the gate's resolution: rounded to 9 decimals (see `decide`)."""
    return round(float(value), 9) + 0.0  # + 0.0: no -0.0 in reports


def decide(results: dict[str, list[RowResult]], *, candidate: str, base: str, sources: list[str],
           policy: Policy | None = None) -> GateResult:
    """Decide every cohort present in the candidate's results (a pure function of its arguments).

    Per cohort, with n rows, every model's per-row scores paired by row id, `best` the source (or base) with
    the highest mean there (ties: sources in the order given, then the base), [low, high] the seeded
    percentile bootstrap interval (`policy.confidence`, `policy.bootstrap` resamples) of mean(candidate − best)
    and [score_low, score_high] the interval of mean(candidate) over the same resampled rows:

    - hold when n < `min_rows` (default 20), whatever the intervals say: with fewer rows one row moves a mean by
      more than 1/20 = 0.05, the default `max_drop`, and a bootstrap of 1–3 rows gives a zero-width or [0, 1]
      interval that proves nothing either way. The cohort stays on its fallback and is mirrored to gather rows.
    - promote when mean(candidate) ≥ `min_score`, retention mean(candidate) / mean(best) ≥ `min_retention`,
      low ≥ −`max_drop` (non-inferior within the allowed drop), and each cost bound the rule sets holds:
      the candidate's p99 per-row latency on the cohort ≤ `max_p99_ms`, and its mean completion tokens /
      best's ≤ `max_tokens_ratio` (costs from `mergegate.costs.cohort_costs` over the cohort's rows);
    - reject when high < −`max_drop` (a regression beyond the allowed drop is established) or score_high <
      `min_score` (a score below the floor is established): the cohort stays on its fallback, not mirrored;
    - hold otherwise, mirroring `mirror_share` of the cohort to the candidate. A broken cost bound alone holds:
      cost is never a reason to reject, and never lets a cohort promote.

    A held or rejected cohort is served by `fallback` if the rule sets one, else by `best`. Every decision
    carries the chain its route falls over along, after the model it is served by: the rule's `fallback` if
    set, then every other source and the base by descending mean on the cohort (ties: sources in the order
    given, then the base) — the candidate never in it.

    Comparisons are made without float noise: every mean, interval bound, ratio, cost and threshold is rounded
    to 9 decimals before it is compared (scores are means of per-row scores in [0, 1], so a bound computed as
    −0.09999999999999998 is −0.1 and sits exactly on a `max_drop` of 0.1, which is non-inferior and not a
    regression). The reported numbers are the rounded ones.

    Each decision also says whether a drop is established (high < 0) and whether it stays within max_drop
    (low ≥ −`max_drop`), at the same resolution: what a report marks as a tolerated drop, never recomputed there.

    The result does not depend on the order of the results: rows are resampled in sorted row-id order with
    a seed from `policy.seed` and the cohort name; cohorts are reported in the order the candidate's results
    first name them. A policy naming a cohort the results lack is refused (PolicyError).
    """
    policy = policy or Policy()
    for role, name in (("candidate", candidate), ("base", base), *(("source", s) for s in sources)):
        if name not in results:
            raise MergegateError(f"gate: no results for {role} '{name}' (results for: {', '.join(results)})")
    scores = {name: {r.row_id: r.score for r in rows} for name, rows in results.items()}
    cohorts = list(dict.fromkeys(r.cohort for r in results[candidate]))
    policy.check_cohorts(cohorts)
    holders = [*sources, base] if base not in sources else list(sources)
    decisions = []
    for cohort in cohorts:
        ids = sorted({r.row_id for r in results[candidate] if r.cohort == cohort})
        for name in holders:
            missing = [i for i in ids if i not in scores[name]]
            if missing:
                raise MergegateError(f"model '{name}' has no result for row(s) {missing[:3]}: results are not paired")
        decisions.append(_decide_cohort(cohort, ids, results, scores, candidate, base, holders, policy))
    aggregate = {name: _q(np.mean([by_id[i] for i in sorted(by_id)])) for name, by_id in scores.items()}
    return GateResult(candidate, decisions, aggregate, policy.sha256)


def _decide_cohort(cohort, ids, results, scores, candidate, base, holders, policy: Policy) -> CohortDecision:
    rule = policy.rule(cohort)
    cand = np.array([scores[candidate][i] for i in ids])
    means = {name: _q(np.mean([scores[name][i] for i in ids])) for name in holders}
    best = max(holders, key=lambda name: means[name])  # first listed wins ties: sources before the base
    best_scores = np.array([scores[best][i] for i in ids])
    interval = _bootstrap(cand, best_scores, policy, cohort)
    diff_low, diff_high, ret_low, ret_high, score_low, score_high = (_q(v) for v in interval)
    cand_mean = _q(cand.mean())
    retention = _q(_ratio(cand.mean(), best_scores.mean()))
    if rule.fallback is not None and rule.fallback not in holders:
        raise PolicyError(f"policy: cohort '{cohort}' falls back to '{rule.fallback}', which is not a source here "
                          f"(sources: {', '.join(holders)})")
    holder = rule.fallback or best
    # Every model ranked by its score here, the base included: a strong generalist is tried before a weak base,
    # a strong base before sources that fail the cohort. sorted() is stable: ties keep the holders' order.
    ranked = sorted(holders, key=lambda name: -means[name])
    chain = [name for name in dict.fromkeys([*([rule.fallback] if rule.fallback else []), *ranked])
             if name != candidate]
    enough = len(ids) >= rule.min_rows

    reasons = []
    if not enough:
        reasons.append(f"only {len(ids)} row(s), below min_rows {rule.min_rows}: too little evidence to decide")
    if cand_mean < _q(rule.min_score):
        reasons.append(f"score {cand_mean:.3f} < min_score {rule.min_score}")
    if retention < _q(rule.min_retention):
        reasons.append(f"retention {retention:.3f} of {best} < min_retention {rule.min_retention}")
    within_max_drop = diff_low >= _q(-rule.max_drop)
    if not within_max_drop:
        reasons.append(f"paired difference vs {best}: {policy.confidence:.0%} interval [{diff_low:+.3f}, "
                       f"{diff_high:+.3f}] reaches below -max_drop {-rule.max_drop}")
    reasons += _cost_reasons(rule, cohort, ids, results, candidate, best)
    decision: Decision
    if not reasons:
        decision, model, mirror = "promote", candidate, 0.0
    elif enough and (diff_high < _q(-rule.max_drop) or score_high < _q(rule.min_score)):
        decision, model, mirror = "reject", holder, 0.0
        if diff_high < _q(-rule.max_drop):
            reasons.append("regression established: the whole interval is below -max_drop")
        if score_high < _q(rule.min_score):
            reasons.append(f"score below min_score established: the candidate's {policy.confidence:.0%} interval "
                           f"[{score_low:.3f}, {score_high:.3f}] is below {rule.min_score}")
    else:
        decision, model, mirror = "hold", holder, rule.mirror_share
    fallbacks = tuple(name for name in chain if name != model)
    return CohortDecision(
        cohort, decision, model, len(ids), cand_mean, best, means[best], means[base],
        _q(cand.mean() - best_scores.mean()), diff_low, diff_high, retention, ret_low, ret_high,
        means, tuple(reasons), mirror, fallbacks, score_low, score_high, drop_established=diff_high < 0,
        within_max_drop=within_max_drop)


def _cost_reasons(rule: CohortRule, cohort: str, ids: list[str], results, candidate: str, best: str) -> list[str]:
    """Why the candidate breaks the rule's cost bounds on the cohort (none set: nothing computed)."""
    if rule.max_p99_ms is None and rule.max_tokens_ratio is None:
        return []
    wanted = set(ids)  # the paired rows only, as for the scores
    costs = cohort_costs({name: [r for r in results[name] if r.row_id in wanted] for name in (candidate, best)})
    cand_cost = next(iter(costs[candidate].values()))
    reasons = []
    if rule.max_p99_ms is not None and _q(cand_cost.latency_p99_ms) > _q(rule.max_p99_ms):
        reasons.append(f"p99 latency {cand_cost.latency_p99_ms:.1f} ms > max_p99_ms {rule.max_p99_ms}")
    if rule.max_tokens_ratio is not None:
        best_tokens = next(iter(costs[best].values())).completion_tokens_mean
        tokens = cand_cost.completion_tokens_mean
        # no tokens from the best source: any tokens at all are an unbounded ratio
        ratio = tokens / best_tokens if best_tokens > 0 else (1.0 if tokens == 0 else float("inf"))
        if _q(ratio) > _q(rule.max_tokens_ratio):
            reasons.append(f"completion tokens {tokens:.1f} per row, {ratio:.2f}x {best}'s {best_tokens:.1f} "
                           f"> max_tokens_ratio {rule.max_tokens_ratio}")
    return reasons


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else (1.0 if a >= b else 0.0)


def _bootstrap(cand: np.ndarray, best: np.ndarray, policy: Policy, cohort: str):
    """Percentile intervals of the paired mean difference, of the retention ratio and of the candidate's mean,
    all from the same resampled rows, seeded per cohort. Resamples are drawn in fixed-size blocks, so memory stays bounded for any `bootstrap` and row count."""
    seed = policy.seed + int.from_bytes(hashlib.sha256(cohort.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    n = len(cand)
    block = max(1, 4_000_000 // n)
    cand_means, best_means = [], []
    for start in range(0, policy.bootstrap, block):
        picks = rng.integers(0, n, size=(min(block, policy.bootstrap - start), n))
        cand_means.append(cand[picks].mean(axis=1))
        best_means.append(best[picks].mean(axis=1))
    cand_m, best_m = np.concatenate(cand_means), np.concatenate(best_means)
    diffs = cand_m - best_m
    ratios = np.where(best_m > 0, cand_m / np.where(best_m > 0, best_m, 1), np.where(cand_m >= best_m, 1.0, 0.0))
    tail = (1 - policy.confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    ret_low, ret_high = np.percentile(ratios, [tail, 100 - tail])
    score_low, score_high = np.percentile(cand_m, [tail, 100 - tail])
    return float(low), float(high), float(ret_low), float(ret_high), float(score_low), float(score_high)
