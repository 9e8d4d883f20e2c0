"""A per-cohort sequential test on live paired scores that stays valid however often it is read.

Each row pairs the candidate's score c and the served model's score s on the same request, both in [0, 1];
d = c − s is in [−1, 1] and y = (1 + d) / 2 in [0, 1], so E[d] = 2·E[y] − 1. The gate's offline rule
"the interval's lower bound of mean(c − s) ≥ −max_drop" becomes, online, a bet against the mean of y
(Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting"):

- the promotion bet tests H0: E[d] ≤ m (on y: E[y] ≤ (1 + m) / 2) with wealth K_t = Π (1 + λ_i (y_i − (1 + m) / 2)),
  λ_i ≥ 0 chosen from the rows before i only (aGRAPA: the growth-rate-adaptive bet of that paper, from a
  regularised running mean and variance), capped at CAP / ((1 + m) / 2) so every factor stays ≥ 1 − CAP > 0.
  Under H0 the wealth is a nonnegative supermartingale, so by Ville's inequality it ever reaches 1/α with
  probability ≤ α, however many times it is read;
- the rollback bet is its mirror image, H0: E[d] ≥ m, betting that y falls below (1 + m) / 2.

Both bets run at every point m of a grid of E[d] values (the margins among them) and remember each point's
largest wealth. The displayed interval runs from the top of the run of points the promotion bet excluded,
counted from −1 up, to the bottom of the run the rollback bet excluded, counted from 1 down
(`CohortEvidence.interval`), so the decision and the interval always agree: promote exactly when the
interval's lower end reaches −max_drop (E[d] > −max_drop established), roll back exactly when its upper end
reaches −harm_margin (E[d] < −harm_margin established). A conclusion, once reached, is never withdrawn by
later rows (the largest wealth only grows).

`α` per side is the gate's: its interval is a two-sided percentile interval at `confidence`, so each one-sided
conclusion (promote, or a regression established) errs with probability (1 − confidence) / 2; here too.

Everything is immutable: `update` returns a new `CohortEvidence`; `to_json` / `from_json` round-trip it exactly,
so a restart resumes the evidence. `family_decisions` controls the family-wise error over many cohorts.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import PolicyError, RegistryError

if TYPE_CHECKING:
    from ..gate import Policy

# Largest bet, as a share of what the null's mean leaves to lose: every factor of the wealth stays ≥ 1 − CAP.
# Waudby-Smith & Ramdas truncate at 1/2 or 3/4; 3/4 concludes sooner on the few rows a cohort usually gets.
CAP = 0.75
# The E[d] values the interval is tested at (besides the margins): steps of 0.01, ±1 left out (a bet against a
# mean of exactly 0 or 1 has no cap).
GRID_STEP = 0.01
_BASE_GRID = tuple(round(i * GRID_STEP, 10) for i in range(-99, 100))
FORMAT = "mergegate.live.paired-betting/1"

Outcome = Literal["promote", "rollback", "inconclusive", "exhausted"]


def side_alpha(confidence: float) -> float:
    """The error each one-sided conclusion is allowed, as the gate's two-sided interval at `confidence` has."""
    return (1.0 - confidence) / 2.0


@dataclass(frozen=True)
class SequentialParams:
    """What a live test of one cohort is run with: the policy's `max_drop` and `confidence`, the margin a
    regression must exceed to roll back (`harm_margin` ≥ max_drop; by default `max_drop`, as the gate's reject
    rule), and the budget after which an inconclusive cohort stays on its source (`max_rows` paired rows
    and/or `max_seconds` since the evidence started; None: no such bound)."""

    max_drop: float = 0.05
    confidence: float = 0.95
    harm_margin: float | None = None
    max_rows: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_drop", "harm_margin"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise PolicyError(f"live test: {name} must be in [0, 1) (a drop of 1 leaves nothing to test), "
                                  f"got {value!r}")
        if self.harm_margin is not None and self.harm_margin < self.max_drop:
            raise PolicyError(f"live test: harm_margin {self.harm_margin} is below max_drop {self.max_drop}: a "
                              f"candidate could be established both non-inferior and harmful")
        if not (isinstance(self.confidence, (int, float)) and 0.5 <= self.confidence < 1):
            raise PolicyError(f"live test: confidence must be in [0.5, 1), got {self.confidence!r}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int)
                                          or self.max_rows < 1):
            raise PolicyError(f"live test: max_rows must be a positive integer or None, got {self.max_rows!r}")
        if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float))
                                                 and 0 < self.max_seconds < math.inf):
            raise PolicyError(f"live test: max_seconds must be a positive number or None, got {self.max_seconds!r}")

    @classmethod
    def from_policy(cls, policy: Policy, cohort: str, *, max_rows: int | None = None,
                    max_seconds: float | None = None) -> SequentialParams:
        """The cohort's `max_drop` and the policy's `confidence` , with a budget."""
        return cls(max_drop=policy.rule(cohort).max_drop, confidence=policy.confidence,
                   max_rows=max_rows, max_seconds=max_seconds)

    @property
    def alpha(self) -> float:
        return side_alpha(self.confidence)

    @property
    def rollback_margin(self) -> float:
        return self.max_drop if self.harm_margin is None else self.harm_margin


@dataclass(frozen=True)
class CohortEvidence:
    """The state of one cohort's live test: everything the next bet and the decision need, nothing else.

    `grid` holds the E[d] values tested (−max_drop and −harm_margin among them); per grid point, the current
    and the largest log-wealth of the promotion bet (`log_wealth_up`, `log_peak_up`) and of the rollback bet
    (`log_wealth_down`, `log_peak_down`). `sum_y` and `sum_sq` give the running mean and variance the next bet
    is sized from. `started_at` (seconds, the caller's clock) is when the evidence started, for a time budget.
    """

    max_drop: float
    harm_margin: float
    grid: tuple[float, ...]
    log_wealth_up: tuple[float, ...]
    log_peak_up: tuple[float, ...]
    log_wealth_down: tuple[float, ...]
    log_peak_down: tuple[float, ...]
    rows: int = 0
    sum_y: float = 0.0
    sum_sq: float = 0.0  # Σ (y_i − mean after row i)², the regularised variance's numerator
    started_at: float | None = None

    @property
    def diff_mean(self) -> float:
        """mean(candidate − served) over the rows so far (0 before any row)."""
        return 2.0 * self.sum_y / self.rows - 1.0 if self.rows else 0.0

    def interval(self, confidence: float) -> tuple[float, float]:
        """A time-uniform confidence interval for E[candidate − served]: it holds at every row at once, each end
        wrong with probability ≤ (1 − confidence) / 2. The lower end is the highest grid point that, with every
        point below it, the promotion bet excluded (E[d] is above it); the upper end the lowest point that,
        with every point above it, the rollback bet excluded (E[d] is below it); −1 and 1 when none is."""
        threshold = -math.log(side_alpha(confidence))
        excluded_below = np.asarray(self.log_peak_up) >= threshold
        excluded_above = np.asarray(self.log_peak_down) >= threshold
        below = _prefix_length(excluded_below)
        above = _prefix_length(excluded_above[::-1])
        low = self.grid[below - 1] if below else -1.0
        high = self.grid[len(self.grid) - above] if above else 1.0
        return low, high

    def log_promote_e(self) -> float:
        """The log of the promotion bet's evidence at the margin: the smallest largest-log-wealth over the grid
        points at or below −max_drop. It reaches log(1/α) exactly when the interval's lower end reaches
        −max_drop; exp(−it) is an anytime-valid p-value for H0: E[d] ≤ −max_drop."""
        points = np.asarray(self.grid) <= -self.max_drop
        return float(np.min(np.asarray(self.log_peak_up)[points]))

    def log_rollback_e(self) -> float:
        """The log of the rollback bet's evidence: the smallest largest-log-wealth over the grid points at or
        above −harm_margin (exp(−it) is an anytime-valid p-value for H0: E[d] ≥ −harm_margin)."""
        points = np.asarray(self.grid) >= -self.harm_margin
        return float(np.min(np.asarray(self.log_peak_down)[points]))

    def to_json(self) -> str:
        """The evidence as JSON; `from_json` gives back an equal object (floats round-trip exactly)."""
        return json.dumps({"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}},
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CohortEvidence:
        """Evidence written by `to_json`. Raises RegistryError naming what is wrong with anything else."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"live evidence: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RegistryError(f"live evidence: not a {FORMAT} record")
        names = {f.name for f in fields(cls)}
        if set(data) - {"format"} != names:
            raise RegistryError(f"live evidence: fields {sorted(set(data) - {'format'})}, "
                                f"expected {sorted(names)}")
        return _checked(cls(**{name: _field_value(name, data[name]) for name in names}))


_PER_GRID_POINT = ("grid", "log_wealth_up", "log_peak_up", "log_wealth_down", "log_peak_down")


def _field_value(name: str, value: Any) -> Any:
    if name == "rows":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RegistryError(f"live evidence: rows must be a nonnegative integer, got {value!r}")
        return value
    if name == "started_at" and value is None:
        return None
    if name in _PER_GRID_POINT:
        if not isinstance(value, list):
            raise RegistryError(f"live evidence: {name} must be a list of numbers, got {type(value).__name__}")
        return tuple(_number(name, v) for v in value)
    return _number(name, value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"live evidence: {name} holds {value!r}, not a finite number")
    return float(value)


def _checked(evidence: CohortEvidence) -> CohortEvidence:
    size = len(evidence.grid)
    for name in _PER_GRID_POINT[1:]:
        if len(getattr(evidence, name)) != size:
            raise RegistryError(f"live evidence: {name} must hold one value per grid point ({size})")
    if list(evidence.grid) != sorted(set(evidence.grid)) or not all(-1 < d < 1 for d in evidence.grid):
        raise RegistryError("live evidence: grid must be increasing values strictly between -1 and 1")
    if not 0 <= evidence.max_drop <= evidence.harm_margin < 1:
        raise RegistryError(f"live evidence: max_drop {evidence.max_drop} and harm_margin {evidence.harm_margin} "
                            f"must satisfy 0 ≤ max_drop ≤ harm_margin < 1")
    for margin in (evidence.max_drop, evidence.harm_margin):
        if -margin not in evidence.grid:
            raise RegistryError(f"live evidence: the margin {-margin} is not a grid point")
    if not (0 <= evidence.sum_y <= evidence.rows and evidence.sum_sq >= 0):
        raise RegistryError(f"live evidence: sum_y {evidence.sum_y} and sum_sq {evidence.sum_sq} do not fit "
                            f"{evidence.rows} row(s) of scores in [0, 1]")
    return evidence


def _prefix_length(flags: np.ndarray) -> int:
    """How many leading entries are all True."""
    misses = np.flatnonzero(~flags)
    return int(misses[0]) if misses.size else len(flags)


def start(params: SequentialParams, *, started_at: float | None = None) -> CohortEvidence:
    """Empty evidence for a cohort tested with `params`' margins (wealth 1 everywhere, no rows)."""
    grid = tuple(sorted({*_BASE_GRID, -float(params.max_drop), -float(params.rollback_margin)}))
    ones = (0.0,) * len(grid)
    return CohortEvidence(max_drop=float(params.max_drop), harm_margin=float(params.rollback_margin), grid=grid,
                          log_wealth_up=ones, log_peak_up=ones, log_wealth_down=ones, log_peak_down=ones,
                          started_at=started_at)


# -- the bet: one code path for one cohort (update) and for many streams at once (the simulation benchmark) --------

def null_means(grid: np.ndarray) -> np.ndarray:
    """The mean of y each grid point of E[d] stands for."""
    return (1.0 + np.asarray(grid, dtype=float)) / 2.0


def bets(rows: np.ndarray, sum_y: np.ndarray, sum_sq: np.ndarray, nulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next row's bets at every null mean, from the rows so far only (predictable): the promotion bet (on y
    above the null) and the rollback bet (on y below it), each ≥ 0 and capped so every factor stays ≥ 1 − CAP.

    aGRAPA: λ = (μ̂ − m) / (σ̂² + (μ̂ − m)²) with μ̂ = (1/2 + Σy) / (n + 1) and σ̂² = (1/4 + Σ(y_i − μ̂_i)²) / (n + 1).
    Leading axes of rows, sum_y and sum_sq are streams; the last axis of the result is the null."""
    mean = ((0.5 + sum_y) / (rows + 1.0))[..., None]
    var = ((0.25 + sum_sq) / (rows + 1.0))[..., None]
    gap = mean - nulls
    agrapa = gap / (var + gap * gap)
    return np.clip(agrapa, 0.0, CAP / nulls), np.clip(-agrapa, 0.0, CAP / (1.0 - nulls))


def bet_step(state: dict[str, np.ndarray], y: np.ndarray, nulls: np.ndarray) -> dict[str, np.ndarray]:
    """One row per stream: bet, then learn. `state` holds rows, sum_y, sum_sq (one per stream) and log_up,
    peak_up, log_down, peak_down (one per stream and null); a new dict is returned."""
    up, down = bets(state["rows"], state["sum_y"], state["sum_sq"], nulls)
    y_col = y[..., None]
    log_up = state["log_up"] + np.log1p(up * (y_col - nulls))
    log_down = state["log_down"] + np.log1p(down * (nulls - y_col))
    rows = state["rows"] + 1
    sum_y = state["sum_y"] + y
    sum_sq = state["sum_sq"] + (y - (0.5 + sum_y) / (rows + 1.0)) ** 2
    return {"rows": rows, "sum_y": sum_y, "sum_sq": sum_sq,
            "log_up": log_up, "peak_up": np.maximum(state["peak_up"], log_up),
            "log_down": log_down, "peak_down": np.maximum(state["peak_down"], log_down)}


def _score(name: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"live evidence: the {name} score must be a number in [0, 1], got {value!r}")
    return float(value)


def update(evidence: CohortEvidence, candidate_score: float, served_score: float) -> CohortEvidence:
    """The evidence after one more paired row (the candidate's and the served model's score on one request)."""
    y = (1.0 + _score("candidate", candidate_score) - _score("served", served_score)) / 2.0
    state = {"rows": np.asarray(float(evidence.rows)), "sum_y": np.asarray(evidence.sum_y),
             "sum_sq": np.asarray(evidence.sum_sq),
             "log_up": np.asarray(evidence.log_wealth_up), "peak_up": np.asarray(evidence.log_peak_up),
             "log_down": np.asarray(evidence.log_wealth_down), "peak_down": np.asarray(evidence.log_peak_down)}
    after = bet_step(state, np.asarray(y), null_means(np.asarray(evidence.grid)))
    return replace(evidence, rows=evidence.rows + 1, sum_y=float(after["sum_y"]), sum_sq=float(after["sum_sq"]),
                   log_wealth_up=_floats(after["log_up"]), log_peak_up=_floats(after["peak_up"]),
                   log_wealth_down=_floats(after["log_down"]), log_peak_down=_floats(after["peak_down"]))


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


# -- decisions ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """A live test's outcome at one look, with the evidence it rests on.

    `diff_low`/`diff_high`: the time-uniform interval of E[candidate − served] at the policy's confidence;
    `promote_e`/`rollback_e`: each bet's evidence at its margin (the largest wealth it reached there), and the
    value each needed to conclude (`promote_threshold`, `rollback_threshold`: 1/α alone, Holm's step in a
    family)."""

    outcome: Outcome
    rows: int
    diff_mean: float
    diff_low: float
    diff_high: float
    promote_e: float
    rollback_e: float
    promote_threshold: float
    rollback_threshold: float
    reason: str


def decide(evidence: CohortEvidence, params: SequentialParams, *, now: float | None = None) -> Decision:
    """The cohort's outcome now (a pure function of its arguments; read it after every row if you like).

    With α = (1 − confidence) / 2 (the gate's error per side) and [low, high] the evidence's time-uniform
    interval of E[candidate − served] at `confidence`:

    - promote when low ≥ −max_drop, i.e. the promotion bet's wealth reached 1/α at −max_drop and at every
      grid point below it: non-inferiority within `max_drop` is established. A candidate at or below the
      margin is promoted with probability ≤ α, however often this is read and whenever it stops;
    - roll back when high ≤ −harm_margin: a drop beyond the margin is established (same guarantee, mirrored).
      Should both be established — contradictory claims (harm_margin ≥ max_drop), so with probability ≤ α
      while the scores' mean stays put — the scores changed under the test: roll back, the cohort's source
      is the safe side;
    - otherwise exhausted when the budget is spent (`max_rows` rows, or `max_seconds` since `started_at` by the
      caller's clock `now`): the cohort stays on its source;
    - otherwise inconclusive: keep gathering.

    A conclusion, once reached, stays (the wealth's maximum never falls); the budget only ends a test that has
    not concluded. The evidence must have been started for the same margins: a policy whose `max_drop` changed
    is a new experiment (PolicyError).
    """
    alpha = _checked_params(evidence, params)
    log_threshold = -math.log(alpha)  # as `interval` compares, so the two always agree
    return _decision(evidence, params, now, evidence.log_promote_e() >= log_threshold,
                     evidence.log_rollback_e() >= log_threshold, 1 / alpha, 1 / alpha)


def _checked_params(evidence: CohortEvidence, params: SequentialParams) -> float:
    if (evidence.max_drop, evidence.harm_margin) != (float(params.max_drop), float(params.rollback_margin)):
        raise PolicyError(f"live test: the evidence was gathered for max_drop {evidence.max_drop} and harm margin "
                          f"{evidence.harm_margin}, the policy now says {params.max_drop} and "
                          f"{params.rollback_margin}: a changed margin starts a new experiment")
    return params.alpha


def _decision(evidence: CohortEvidence, params: SequentialParams, now: float | None, promoted: bool,
              rolled_back: bool, promote_threshold: float, rollback_threshold: float) -> Decision:
    low, high = evidence.interval(params.confidence)
    outcome: Outcome
    if rolled_back:
        outcome = "rollback"
        reason = (f"a drop beyond {params.rollback_margin} is established: interval [{low:+.2f}, {high:+.2f}] "
                  f"after {evidence.rows} row(s)")
        if promoted:
            reason += "; non-inferiority was established too, so the scores changed under the test"
    elif promoted:
        outcome = "promote"
        reason = (f"non-inferior within max_drop {params.max_drop}: interval [{low:+.2f}, {high:+.2f}] "
                  f"after {evidence.rows} row(s)")
    elif (spent := _budget_spent(evidence, params, now)) is not None:
        outcome, reason = "exhausted", f"{spent} without a conclusion: the cohort stays on its source"
    else:
        outcome = "inconclusive"
        reason = f"interval [{low:+.2f}, {high:+.2f}] after {evidence.rows} row(s): keep gathering"
    return Decision(outcome, evidence.rows, evidence.diff_mean, low, high, _e_value(evidence.log_promote_e()),
                    _e_value(evidence.log_rollback_e()), _shown(promote_threshold), _shown(rollback_threshold), reason)


def _e_value(log_e: float) -> float:
    """exp(log_e), infinite past the largest float (a bet that kept winning for a thousand rows and more)."""
    return math.exp(log_e) if log_e < math.log(sys.float_info.max) else math.inf


def _shown(threshold: float) -> float:
    """A threshold as reported, without float noise ((1 − 0.95) / 2 is 0.025000000000000022: 1/α shows as 40)."""
    return round(threshold, 9)


def _budget_spent(evidence: CohortEvidence, params: SequentialParams, now: float | None) -> str | None:
    if params.max_rows is not None and evidence.rows >= params.max_rows:
        return f"the budget of {params.max_rows} rows is spent"
    if params.max_seconds is not None:
        if now is None or evidence.started_at is None:
            raise ValueError("live test: a time budget needs the evidence's started_at and the caller's now")
        if now - evidence.started_at >= params.max_seconds:
            return f"the budget of {params.max_seconds:g} s is spent"
    return None


def family_decisions(evidences: Mapping[str, CohortEvidence], params: Mapping[str, SequentialParams], *,
                     now: float | None = None) -> dict[str, Decision]:
    """Every cohort's outcome with the family-wise error controlled: the chance that any cohort at or below
    its margin is promoted (or any at or above its harm margin rolled back) is ≤ α over the whole family,
    however often this is read.

    The rule, per side (promotions, then rollbacks, separately): Holm's step-down on the anytime-valid p-values
    1/e, e each cohort's evidence at its margin (`CohortEvidence.log_promote_e` / `log_rollback_e`) — the closure of
    e-Bonferroni. Sort the K cohorts by e, largest first; the cohort ranked j (0-based) concludes when every
    cohort ranked 0..j has e ≥ (K − rank)/α. Valid at every look because each e is its bet's running maximum
    wealth (Ville's inequality per cohort, Bonferroni over the true nulls), and it never withdraws a
    conclusion: e only grows, and Holm's rejections only grow with it. (The arithmetic-mean e-Holm rejects a
    little more but must be read on current wealths, which fall: its conclusions could come and go.)

    `evidences` must hold every cohort under test, those without rows too: leaving one out raises the others'
    chance of a false conclusion. `params` gives each cohort's margins and budget; all share one confidence.
    Ties in e are ranked by cohort name. The rest of each decision is `decide`'s.
    """
    if set(evidences) != set(params):
        raise PolicyError(f"live test: evidence for {sorted(evidences)} but parameters for {sorted(params)}")
    confidences = {p.confidence for p in params.values()}
    if len(confidences) > 1:
        raise PolicyError(f"live test: one confidence for the whole family, got {sorted(confidences)}")
    alphas = {cohort: _checked_params(evidences[cohort], params[cohort]) for cohort in evidences}
    alpha = next(iter(alphas.values()), 0.025)
    up_steps = _holm({cohort: ev.log_promote_e() for cohort, ev in evidences.items()}, alpha)
    down_steps = _holm({cohort: ev.log_rollback_e() for cohort, ev in evidences.items()}, alpha)
    return {cohort: _decision(evidences[cohort], params[cohort], now, up_steps[cohort][0], down_steps[cohort][0],
                              up_steps[cohort][1], down_steps[cohort][1])
            for cohort in evidences}


def _holm(log_e: dict[str, float], alpha: float) -> dict[str, tuple[bool, float]]:
    """Per cohort: whether Holm's step-down on 1/e concludes it, and the e its rank's step needs, (K − rank)/α
    (compared in logs: K = 1 gives −log α, exactly what `decide` compares)."""
    ranked = sorted(log_e, key=lambda cohort: (-log_e[cohort], cohort))
    steps, going = {}, True
    for rank, cohort in enumerate(ranked):
        going = going and log_e[cohort] >= math.log(len(ranked) - rank) - math.log(alpha)
        steps[cohort] = (going, (len(ranked) - rank) / alpha)
    return steps


# -- canary: two randomized arms, paired by arrival --------------------------------------------------------------

Arm = Literal["candidate", "served"]
# Scores of the arm ahead kept for pairing; older ones are dropped (a canary share of 10% leaves the served arm
# nine rows ahead for every candidate row).
MAX_WAITING = 64


@dataclass(frozen=True)
class CanaryEvidence:
    """A canary's evidence: the candidate serves a random share of the cohort, the source the rest, so no request
    has both scores. Each candidate score is paired with the oldest waiting served score (or the other way
    round) and the pair fed to the paired test (`paired`), whose decisions then hold for E[candidate] −
    E[served] across the arms: which scores pair depends only on the order they arrive in, never on their
    values, so with requests assigned to the arms at random every pair is an independent draw of the two arms.
    `waiting` holds the arm ahead's scores not yet paired (at most MAX_WAITING, the oldest dropped first and
    counted in `dropped`)."""

    paired: CohortEvidence
    waiting_arm: Arm | None = None
    waiting: tuple[float, ...] = ()
    dropped: int = 0

    def to_json(self) -> str:
        return json.dumps({"format": CANARY_FORMAT, "paired": json.loads(self.paired.to_json()),
                           "waiting_arm": self.waiting_arm, "waiting": list(self.waiting),
                           "dropped": self.dropped}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CanaryEvidence:
        """Evidence written by `to_json`. Raises RegistryError naming what is wrong with anything else."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"live canary evidence: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != CANARY_FORMAT \
                or set(data) != {"format", "paired", "waiting_arm", "waiting", "dropped"}:
            raise RegistryError(f"live canary evidence: not a {CANARY_FORMAT} record")
        arm, waiting, dropped = data["waiting_arm"], data["waiting"], data["dropped"]
        if arm not in (None, "candidate", "served") or not isinstance(waiting, list) \
                or len(waiting) > MAX_WAITING or (arm is None) != (not waiting):
            raise RegistryError("live canary evidence: waiting_arm and waiting disagree")
        if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
            raise RegistryError(f"live canary evidence: dropped must be a nonnegative integer, got {dropped!r}")
        scores = tuple(_number("waiting", v) for v in waiting)
        if not all(0 <= v <= 1 for v in scores):
            raise RegistryError("live canary evidence: waiting scores must be in [0, 1]")
        return cls(CohortEvidence.from_json(json.dumps(data["paired"])), arm, scores, dropped)


CANARY_FORMAT = "mergegate.live.canary-betting/1"


def start_canary(params: SequentialParams, *, started_at: float | None = None) -> CanaryEvidence:
    return CanaryEvidence(start(params, started_at=started_at))


def record_canary(evidence: CanaryEvidence, arm: Arm, score: float) -> CanaryEvidence:
    """The canary's evidence after one more score from `arm`; `decide(evidence.paired, ...)` reads it."""
    if arm not in ("candidate", "served"):
        raise ValueError(f"live canary evidence: arm must be 'candidate' or 'served', got {arm!r}")
    value = _score(arm, score)
    if evidence.waiting and evidence.waiting_arm != arm:
        other, rest = evidence.waiting[0], evidence.waiting[1:]
        candidate, served = (value, other) if arm == "candidate" else (other, value)
        return replace(evidence, paired=update(evidence.paired, candidate, served),
                       waiting_arm=evidence.waiting_arm if rest else None, waiting=rest)
    waiting = (*evidence.waiting, value)
    overflow = max(0, len(waiting) - MAX_WAITING)
    return replace(evidence, waiting_arm=arm, waiting=waiting[overflow:], dropped=evidence.dropped + overflow)
