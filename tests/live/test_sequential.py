"""The live sequential test: its wealth against a plain reference, its properties, its decisions, its error rate."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate.errors import PolicyError, RegistryError
from mergegate.gate import Policy
from mergegate.live import (
    CanaryEvidence,
    CohortEvidence,
    SequentialParams,
    decide,
    family_decisions,
    record_canary,
    start,
    start_canary,
    update,
)
from mergegate.live.sequential import CAP, bet_step, null_means

PARAMS = SequentialParams(max_drop=0.05, confidence=0.95)
scores = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
pairs = st.lists(st.tuples(scores, scores), max_size=40)


def fold(rows, params=PARAMS, evidence=None):
    """Every evidence along the rows, the start included."""
    states = [evidence or start(params)]
    for candidate, served in rows:
        states.append(update(states[-1], candidate, served))
    return states


# -- (a) against an independent reference -------------------------------------------------------------------------

def reference_moments(ys: list[float]) -> list[tuple[float, float]]:
    """Before each row, the regularised mean and variance of the rows before it, recomputed from scratch."""
    moments = []
    for i in range(len(ys)):
        running_means = [(0.5 + sum(ys[:k + 1])) / (k + 2) for k in range(i)]
        var = (0.25 + sum((ys[k] - running_means[k]) ** 2 for k in range(i))) / (i + 1)
        moments.append(((0.5 + sum(ys[:i])) / (i + 1), var))
    return moments


def reference_wealth(ys: list[float], null: float, side: str, moments=None) -> list[float]:
    """Waudby-Smith & Ramdas's betting wealth written out plainly, a product over the rows: the aGRAPA bet from
    the moments before each row, truncated to [0, CAP/null] (or [0, CAP/(1 − null)] betting downwards)."""
    wealth, path = 1.0, []
    for y, (mean, var) in zip(ys, moments or reference_moments(ys)):
        bet = (mean - null) / (var + (mean - null) ** 2)
        if side == "up":
            wealth *= 1 + min(max(bet, 0.0), CAP / null) * (y - null)
        else:
            wealth *= 1 + min(max(-bet, 0.0), CAP / (1 - null)) * (null - y)
        path.append(wealth)
    return path


@pytest.mark.parametrize("seed", range(4))
def test_wealth_matches_a_plain_reference_at_every_row(seed):
    rng = np.random.default_rng(seed)
    candidate = rng.beta(2, 2, 60) if seed % 2 else (rng.random(60) < 0.7).astype(float)
    served = rng.beta(2, 3, 60) if seed % 2 else (rng.random(60) < 0.6).astype(float)
    states = fold(zip(candidate.tolist(), served.tolist()))[1:]
    ys = ((1 + candidate - served) / 2).tolist()
    grid = states[0].grid
    for point in (-0.05, -0.5, 0.0, 0.3):
        at = grid.index(point)
        null = (1 + point) / 2
        for side, name in (("up", "log_wealth_up"), ("down", "log_wealth_down")):
            expected = np.log(reference_wealth(ys, null, side))
            got = [getattr(state, name)[at] for state in states]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_decision_and_interval_match_the_reference_rule():
    """Promote exactly when every grid point at or below −max_drop once had wealth ≥ 1/α; the interval's lower
    end is the top of the excluded run from −1 up (the reference, on the reference's wealth)."""
    rng = np.random.default_rng(7)
    for effect in (0.0, 0.1, -0.1):
        served = (rng.random(80) < 0.6).astype(float)
        candidate = np.where(rng.random(80) < 0.5, served, (rng.random(80) < 0.6 + 2 * effect).astype(float))
        rows = list(zip(candidate.tolist(), served.tolist()))
        ys = [(1 + c - s) / 2 for c, s in rows]
        evidence = fold(rows)[-1]
        moments = reference_moments(ys)
        peaks = [max(reference_wealth(ys, (1 + point) / 2, "up", moments)) for point in evidence.grid]
        excluded = [peak >= 1 / PARAMS.alpha for peak in peaks]
        run = next((i for i, flag in enumerate(excluded) if not flag), len(excluded))
        low = evidence.grid[run - 1] if run else -1.0
        assert evidence.interval(PARAMS.confidence)[0] == pytest.approx(low)
        promoted = all(flag for point, flag in zip(evidence.grid, excluded) if point <= -PARAMS.max_drop)
        assert (decide(evidence, PARAMS).outcome == "promote") == promoted


def test_the_batched_step_is_the_one_update_uses():
    """The simulation benchmark steps many streams at once through bet_step: the same numbers as update."""
    rng = np.random.default_rng(3)
    candidate, served = rng.random((3, 25)), rng.random((3, 25))
    grid = np.array(start(PARAMS).grid)
    state = {"rows": np.zeros(3), "sum_y": np.zeros(3), "sum_sq": np.zeros(3),
             **{name: np.zeros((3, grid.size)) for name in ("log_up", "peak_up", "log_down", "peak_down")}}
    for t in range(25):
        state = bet_step(state, (1 + candidate[:, t] - served[:, t]) / 2, null_means(grid))
    for stream in range(3):
        evidence = fold(zip(candidate[stream].tolist(), served[stream].tolist()))[-1]
        np.testing.assert_allclose(state["peak_up"][stream], evidence.log_peak_up, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state["log_down"][stream], evidence.log_wealth_down, rtol=0, atol=1e-12)


# -- (b) properties ------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs)
def test_wealth_stays_positive_and_finite(rows):
    evidence = fold(rows)[-1]
    floor = len(rows) * math.log(1 - CAP)  # every factor is at least 1 − CAP
    for name in ("log_wealth_up", "log_peak_up", "log_wealth_down", "log_peak_down"):
        values = np.asarray(getattr(evidence, name))
        assert np.all(np.isfinite(values)) and np.all(values >= floor - 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs, st.randoms(use_true_random=False))
def test_bets_use_past_rows_only(rows, random):
    """Reordering the rows after row k never changes the evidence up to row k; and the wealth after a row is
    affine in that row's y (its bet was fixed before the row was seen)."""
    k = len(rows) // 2
    shuffled = rows[:k] + random.sample(rows[k:], len(rows) - k)
    assert fold(rows)[:k + 1] == fold(shuffled)[:k + 1]
    before = fold(rows)[-1]
    low, mid, high = (np.exp(update(before, c, s).log_wealth_up) for c, s in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)))
    np.testing.assert_allclose(mid, (low + high) / 2, rtol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs, st.sampled_from([None, 0.0, 1.5e9]))
def test_evidence_round_trips_through_json_exactly(rows, started_at):
    evidence = fold(rows, evidence=start(PARAMS, started_at=started_at))[-1]
    again = CohortEvidence.from_json(evidence.to_json())
    assert again == evidence and again.to_json() == evidence.to_json()
    assert decide(again, PARAMS) == decide(evidence, PARAMS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["candidate", "served"]), scores), max_size=60))
def test_canary_evidence_round_trips_and_pairs_by_arrival(arrivals):
    canary = start_canary(PARAMS)
    for arm, score in arrivals:
        canary = record_canary(canary, arm, score)
        assert CanaryEvidence.from_json(canary.to_json()) == canary
    fewer = min(sum(1 for a, _ in arrivals if a == arm) for arm in ("candidate", "served"))
    assert 2 * canary.paired.rows + len(canary.waiting) + canary.dropped == len(arrivals)  # no score counted twice
    assert canary.paired.rows <= fewer and (canary.dropped or canary.paired.rows == fewer)


def test_canary_pairs_the_oldest_waiting_score_of_the_other_arm():
    canary = start_canary(PARAMS)
    for score in (0.1, 0.2, 0.3):
        canary = record_canary(canary, "served", score)
    canary = record_canary(canary, "candidate", 1.0)
    assert canary.waiting == (0.2, 0.3) and canary.waiting_arm == "served"
    assert canary.paired == update(start(PARAMS), 1.0, 0.1)


@pytest.mark.parametrize("text, problem", [
    ("{", "not JSON"),
    ('{"format": "something else"}', "not a"),
    ("[]", "not a"),
])
def test_malformed_evidence_is_refused_by_name(text, problem):
    with pytest.raises(RegistryError, match=problem):
        CohortEvidence.from_json(text)


def test_evidence_with_a_bad_field_is_refused_by_name():
    record = json.loads(fold([(1.0, 0.0)] * 3)[-1].to_json())
    bad = [("rows", -1), ("rows", True), ("sum_y", "1"), ("sum_y", [1.0]), ("sum_y", 4.0), ("sum_sq", float("nan")),
           ("log_peak_up", [0.0]), ("grid", record["grid"][::-1]), ("grid", 0.5), ("max_drop", 0.07)]
    for name, value in bad:
        with pytest.raises(RegistryError, match=name):
            CohortEvidence.from_json(json.dumps({**record, name: value}))
    with pytest.raises(RegistryError, match="fields"):
        CohortEvidence.from_json(json.dumps({key: v for key, v in record.items() if key != "sum_sq"}))


# -- (c) decisions ---------------------------------------------------------------------------------------------------

def first_conclusion(rows, params=PARAMS):
    evidence = start(params)
    for candidate, served in rows:
        evidence = update(evidence, candidate, served)
        decision = decide(evidence, params)
        if decision.outcome != "inconclusive":
            return decision
    return decide(evidence, params)


def test_a_clearly_better_candidate_is_promoted_within_a_bounded_number_of_rows():
    rng = np.random.default_rng(0)
    served = (rng.random(200) < 0.5).astype(float)
    candidate = np.maximum(served, (rng.random(200) < 0.6).astype(float))  # wins ≈ 30% of rows, never loses
    decision = first_conclusion(zip(candidate.tolist(), served.tolist()))
    assert decision.outcome == "promote" and decision.rows <= 60
    assert decision.diff_low >= -PARAMS.max_drop and decision.promote_e >= decision.promote_threshold == 40


def test_a_clearly_worse_candidate_is_rolled_back():
    rng = np.random.default_rng(1)
    served = rng.beta(6, 2, 200)
    candidate = served * 0.6  # a 40% lower score on every row
    decision = first_conclusion(zip(candidate.tolist(), served.tolist()))
    assert decision.outcome == "rollback" and decision.rows <= 40
    assert decision.diff_high <= -PARAMS.max_drop


def test_five_rows_are_inconclusive_even_if_the_candidate_wins_them_all():
    evidence = fold([(1.0, 0.0)] * 5)[-1]
    decision = decide(evidence, PARAMS)
    assert decision.outcome == "inconclusive" and decision.rows == 5 and decision.diff_mean == 1.0
    assert decision.diff_low < -PARAMS.max_drop < decision.diff_high


def test_an_inconclusive_cohort_is_exhausted_at_its_row_budget_and_stays_on_its_source():
    params = SequentialParams(max_drop=0.05, max_rows=30)
    states = fold([(0.7, 0.7)] * 30, params)  # ties: far too little evidence in 30 rows for a 0.05 margin
    assert decide(states[29], params).outcome == "inconclusive"
    decision = decide(states[30], params)
    assert decision.outcome == "exhausted" and "stays on its source" in decision.reason


def test_the_time_budget_counts_from_the_evidence_start_by_the_callers_clock():
    params = SequentialParams(max_seconds=60)
    evidence = fold([(0.5, 0.5)] * 3, params, start(params, started_at=1000.0))[-1]
    assert decide(evidence, params, now=1059.0).outcome == "inconclusive"
    assert decide(evidence, params, now=1060.0).outcome == "exhausted"
    with pytest.raises(ValueError, match="now"):
        decide(evidence, params)


def test_a_conclusion_stays_and_conflicting_evidence_rolls_back():
    states = fold([(1.0, 0.0)] * 12)
    promoted_at = next(i for i, s in enumerate(states) if decide(s, PARAMS).outcome == "promote")
    after = fold([(0.6, 0.5), (0.5, 0.6)] * 3, evidence=states[promoted_at])
    assert all(decide(s, PARAMS).outcome == "promote" for s in after)  # later rows never withdraw it
    broken = fold([(0.0, 1.0)] * 200, evidence=after[-1])  # the candidate breaks after promotion
    decision = decide(broken[-1], PARAMS)
    assert decision.outcome == "rollback" and "changed" in decision.reason


def test_params_come_from_the_policy_and_a_changed_margin_is_a_new_experiment():
    policy = Policy.model_validate({"confidence": 0.9, "cohorts": {"json": {"max_drop": 0.1}}})
    params = SequentialParams.from_policy(policy, "json", max_rows=500)
    assert (params.max_drop, params.alpha, params.rollback_margin, params.max_rows) == (0.1, pytest.approx(0.05),
                                                                                       0.1, 500)
    with pytest.raises(PolicyError, match="max_drop"):
        decide(start(PARAMS), params)
    with pytest.raises(PolicyError, match="max_drop"):
        SequentialParams(max_drop=1.0)
    with pytest.raises(PolicyError, match="harm_margin"):
        SequentialParams(max_drop=0.1, harm_margin=0.05)
    with pytest.raises(ValueError, match="candidate score"):
        update(start(PARAMS), float("nan"), 0.5)
    with pytest.raises(ValueError, match="served score"):
        update(start(PARAMS), 0.5, 1.5)


# -- family-wise control -------------------------------------------------------------------------------------------

def test_alone_the_family_rule_is_decide():
    for rows in ([(1.0, 0.0)] * 9, [(0.0, 1.0)] * 9, [(0.5, 0.5)] * 4):
        evidence = fold(rows)[-1]
        assert family_decisions({"only": evidence}, {"only": PARAMS}) == {"only": decide(evidence, PARAMS)}


def test_holm_asks_more_of_a_cohort_while_others_are_undecided():
    just = first_conclusion([(1.0, 0.0)] * 20)  # promoted alone, with e just past 1/α
    evidence = fold([(1.0, 0.0)] * just.rows)[-1]
    assert 40 <= just.promote_e < 3 * 40
    undecided = {"a": evidence, "b": start(PARAMS), "c": start(PARAMS)}
    params = dict.fromkeys(undecided, PARAMS)
    family = family_decisions(undecided, params)
    assert family["a"].outcome == "inconclusive" and family["a"].promote_threshold == pytest.approx(120)
    strong = fold([(1.0, 0.0)] * 40)[-1]  # e far beyond 3/α
    family = family_decisions({"a": evidence, "b": strong, "c": strong}, params)
    assert {cohort: d.outcome for cohort, d in family.items()} == dict.fromkeys("abc", "promote")
    assert family["a"].promote_threshold == pytest.approx(40)
    with pytest.raises(PolicyError, match="confidence"):
        family_decisions({"a": evidence, "b": strong}, {"a": PARAMS, "b": SequentialParams(confidence=0.9)})


# -- (d) the error rate under optional stopping --------------------------------------------------------------------

def test_a_candidate_exactly_at_the_margin_is_promoted_at_most_alpha_of_the_time_reading_every_row():
    """500 seeded streams whose paired y is 0 or 1 with mean exactly (1 − max_drop)/2 (the hardest case: the
    largest variance at the margin), the decision read after each of 300 rows: since a conclusion stays, the
    share promoted at the end is the share ever promoted. α = 0.05 here; the slack is three Monte-Carlo SDs."""
    params = SequentialParams(max_drop=0.05, confidence=0.9)
    grid = np.array(start(params).grid)
    streams, rows = 500, 300
    y = (np.random.default_rng(11).random((streams, rows)) < (1 - params.max_drop) / 2).astype(float)
    state = {"rows": np.zeros(streams), "sum_y": np.zeros(streams), "sum_sq": np.zeros(streams),
             **{name: np.zeros((streams, grid.size)) for name in ("log_up", "peak_up", "log_down", "peak_down")}}
    for t in range(rows):
        state = bet_step(state, y[:, t], null_means(grid))
    promoted = np.all(state["peak_up"][:, grid <= -params.max_drop] >= -math.log(params.alpha), axis=1)
    slack = 3 * math.sqrt(params.alpha * (1 - params.alpha) / streams)
    assert promoted.mean() <= params.alpha + slack


# -- the simulation benchmark's core -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simulation():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "live_simulation.py"
    spec = importlib.util.spec_from_file_location("live_simulation", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_simulation_benchmark_runs_at_tiny_sizes(simulation):
    tables = simulation.run(streams=40, families=20, max_rows=60, naive_streams=20, effects=(-0.2, 0.0, 0.15))
    assert "| binary |" in tables and "| continuous |" in tables and "e-Holm" in tables and "bootstrap" in tables


def test_the_simulations_holm_is_family_decisions(simulation):
    rng = np.random.default_rng(5)
    params = dict.fromkeys("abcde", simulation.PARAMS)
    for _ in range(6):
        wins = rng.integers(0, 16, size=5)
        evidences = {cohort: fold([(1.0, 0.0)] * int(n), simulation.PARAMS)[-1] for cohort, n in zip("abcde", wins)}
        log_e = np.array([[evidences[cohort].log_promote_e() for cohort in "abcde"]])
        steps = np.log(np.arange(5, 0, -1)) - math.log(simulation.PARAMS.alpha)
        family = family_decisions(evidences, params)
        assert simulation._concluded(log_e, steps, True)[0].tolist() == \
            [family[cohort].outcome == "promote" for cohort in "abcde"]


def test_the_simulations_bootstrap_is_the_gates(simulation):
    from mergegate.gate import _bootstrap

    rng = np.random.default_rng(2)
    candidate, served = rng.beta(2, 2, 70), rng.beta(2, 3, 70)
    policy = Policy()  # the simulation's confidence and resamples
    assert (policy.confidence, policy.bootstrap) == (simulation.PARAMS.confidence, simulation.NAIVE_RESAMPLES)
    seed = int.from_bytes(hashlib.sha256(b"c").digest()[:4], "little")  # as the gate seeds cohort "c"
    low, high = simulation.bootstrap_bounds(candidate - served, "continuous", np.random.default_rng(seed))
    assert (low, high) == pytest.approx(_bootstrap(candidate, served, policy, "c")[:2], abs=1e-12)


def test_a_long_winning_stream_is_decided_without_overflow():
    # thousands of rows far above the margin: the promotion bet's log-wealth passes what exp() can take (≈ 709); the
    # decision still reads (its e-value infinite), as a drift stream with no budget reads for as long as it runs
    params = SequentialParams(max_drop=0.1)
    evidence = start(params)
    for _ in range(1500):
        evidence = update(evidence, 1.0, 0.0)
    assert evidence.log_promote_e() > 710
    decision = decide(evidence, params)
    assert decision.outcome == "promote" and decision.promote_e == math.inf
    assert family_decisions({"a": evidence}, {"a": params})["a"].outcome == "promote"
