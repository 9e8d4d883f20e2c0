"""The gate: per cohort, promote the candidate, hold the cohort on a source, or reject the candidate there.

Judged on paired per-row differences against the best source on that cohort (every model answered the
same rows), with a seeded bootstrap confidence interval — never on an aggregate mean, which is only
reported beside. The rules are a non-inferiority test:

- promote: candidate mean ≥ `min_score`, retention (candidate / best source) ≥ `min_retention`, and the
  interval's lower bound of (candidate − best) ≥ −`max_drop`.
- reject: the interval's upper bound < −`max_drop`: a regression beyond the allowed drop is established.
  The cohort stays on its fallback and the candidate is not even mirrored there.
- hold: anything else (not shown non-inferior, but no regression established either): the cohort stays on
  its fallback source, and a share of its traffic is mirrored to the candidate to gather evidence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MergegateError
from .registry import RowResult


class PolicyError(MergegateError, ValueError):
    """A gate policy is malformed."""


class CohortRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float = Field(0.0, ge=0, le=1)
    max_drop: float = Field(0.05, ge=0, le=1)
    min_retention: float = Field(0.9, ge=0)
    fallback: str | None = None  # a source to hold on; default: the best source on the cohort
    mirror_share: float = Field(0.1, ge=0, le=1)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap: int = Field(2000, ge=100)
    seed: int = 0
    default: CohortRule = CohortRule()
    cohorts: dict[str, CohortRule] = {}

    def rule(self, cohort: str) -> CohortRule:
        if cohort not in self.cohorts:
            return self.default
        # a cohort's rule overrides only the fields it sets
        return self.default.model_copy(update=self.cohorts[cohort].model_dump(exclude_unset=True))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def load_policy(source: str | Path | dict | Policy | None) -> Policy:
    if source is None:
        return Policy()
    if isinstance(source, Policy):
        return source
    where = "policy"
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise PolicyError(f"policy {path}: no such file")
        where, source = str(path), yaml.safe_load(path.read_text()) or {}
    try:
        return Policy.model_validate(source)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise PolicyError(f"{where}: {detail}") from None


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
    fallback: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateResult:
    candidate: str
    decisions: list[CohortDecision]
    aggregate: dict[str, float]  # overall mean per model: reported, never decisive
    policy_sha256: str

    def decision(self, cohort: str) -> CohortDecision:
        return next(d for d in self.decisions if d.cohort == cohort)


def decide(results: dict[str, list[RowResult]], *, candidate: str, base: str, sources: list[str],
           policy: Policy | None = None) -> GateResult:
    """Decide every cohort present in the candidate's results."""
    policy = policy or Policy()
    scores = {name: {r.row_id: r.score for r in rows} for name, rows in results.items()}
    cohorts = list(dict.fromkeys(r.cohort for r in results[candidate]))
    holders = [*sources, base] if base not in sources else list(sources)
    decisions = []
    for cohort in cohorts:
        ids = [r.row_id for r in results[candidate] if r.cohort == cohort]
        for name in holders:
            missing = [i for i in ids if i not in scores[name]]
            if missing:
                raise MergegateError(f"model '{name}' has no result for row(s) {missing[:3]}: results are not paired")
        decisions.append(_decide_cohort(cohort, ids, scores, candidate, base, holders, policy))
    aggregate = {name: float(np.mean(list(by_id.values()))) for name, by_id in scores.items()}
    return GateResult(candidate, decisions, aggregate, policy.sha256)


def _decide_cohort(cohort, ids, scores, candidate, base, holders, policy: Policy) -> CohortDecision:
    rule = policy.rule(cohort)
    cand = np.array([scores[candidate][i] for i in ids])
    means = {name: float(np.mean([scores[name][i] for i in ids])) for name in holders}
    best = max(holders, key=lambda name: means[name])  # first listed wins ties: sources before the base
    best_scores = np.array([scores[best][i] for i in ids])
    diff_low, diff_high, ret_low, ret_high = _bootstrap(cand, best_scores, policy, cohort)
    retention = _ratio(cand.mean(), best_scores.mean())
    fallback = rule.fallback or best
    if fallback not in holders:
        raise PolicyError(f"policy: cohort '{cohort}' falls back to '{fallback}', which is not a source here "
                          f"(sources: {', '.join(holders)})")

    reasons = []
    if cand.mean() < rule.min_score:
        reasons.append(f"score {cand.mean():.3f} < min_score {rule.min_score}")
    if retention < rule.min_retention:
        reasons.append(f"retention {retention:.3f} of {best} < min_retention {rule.min_retention}")
    if diff_low < -rule.max_drop:
        reasons.append(f"paired difference vs {best}: {policy.confidence:.0%} interval [{diff_low:+.3f}, "
                       f"{diff_high:+.3f}] reaches below -max_drop {-rule.max_drop}")
    chain = [name for name in (fallback, best, base) if name != candidate]
    if not reasons:
        decision, model, mirror, chain = "promote", candidate, 0.0, chain
    elif diff_high < -rule.max_drop:
        decision, model, mirror = "reject", fallback, 0.0
        reasons.append("regression established: the whole interval is below -max_drop")
    else:
        decision, model, mirror = "hold", fallback, rule.mirror_share
    fallbacks = tuple(dict.fromkeys(name for name in chain if name != model))
    return CohortDecision(
        cohort, decision, model, len(ids), float(cand.mean()), best, means[best], means[base],
        float(cand.mean() - best_scores.mean()), diff_low, diff_high, retention, ret_low, ret_high,
        means, tuple(reasons), mirror, fallbacks)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else (1.0 if a >= b else 0.0)


def _bootstrap(cand: np.ndarray, best: np.ndarray, policy: Policy, cohort: str):
    """Percentile intervals of the paired mean difference and of the retention ratio, seeded per cohort."""
    seed = policy.seed + int.from_bytes(hashlib.sha256(cohort.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(cand), size=(policy.bootstrap, len(cand)))
    cand_means, best_means = cand[picks].mean(axis=1), best[picks].mean(axis=1)
    diffs = cand_means - best_means
    ratios = np.where(best_means > 0, cand_means / np.where(best_means > 0, best_means, 1),
                      np.where(cand_means >= best_means, 1.0, 0.0))
    tail = (1 - policy.confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    ret_low, ret_high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high), float(ret_low), float(ret_high)
