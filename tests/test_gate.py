"""Gate decisions on constructed per-row results."""

from __future__ import annotations

import numpy as np
import pytest

from mergegate.gate import Policy, PolicyError, decide, load_policy
from mergegate.registry import RowResult


def rows(model: str, cohort: str, scores) -> list[RowResult]:
    return [RowResult(f"{cohort}-{i}", cohort, model, "h", "", 1, 1, 1.0, float(s), s >= 0.5, {})
            for i, s in enumerate(scores)]


def binary(p: float, n: int, seed: int) -> np.ndarray:
    """n scores with exactly round(p * n) ones, shuffled."""
    ones = round(p * n)
    values = np.array([1.0] * ones + [0.0] * (n - ones))
    np.random.default_rng(seed).shuffle(values)
    return values


def results(spec: dict[str, dict[str, np.ndarray]]) -> dict[str, list[RowResult]]:
    return {model: [r for cohort, s in cohorts.items() for r in rows(model, cohort, s)]
            for model, cohorts in spec.items()}


def test_aggregate_gain_does_not_hide_a_significant_cohort_regression():
    n = 120
    tool, js, ref = binary(0.9, n, 1), binary(0.8, n, 2), binary(0.9, n, 3)
    base = {"tool": binary(0.5, n, 4), "json": binary(0.2, n, 5), "refusal": binary(0.5, n, 6)}
    spec = {
        "base": base,
        "spec_tool": {**base, "tool": tool},
        "spec_json": {**base, "json": js},
        "spec_refusal": {**base, "refusal": ref},
        # candidate: as good as each specialist on tool and refusal, far worse on json
        "merged": {"tool": tool, "json": np.where(js * binary(0.3, n, 7) > 0, 1.0, 0.0), "refusal": ref},
    }
    gate = decide(results(spec), candidate="merged", base="base", sources=["spec_tool", "spec_json", "spec_refusal"])
    assert gate.aggregate["merged"] > max(v for k, v in gate.aggregate.items() if k != "merged")
    json_decision = gate.decision("json")
    assert json_decision.decision == "reject" and json_decision.model == "spec_json"
    assert json_decision.diff_high < -0.05 and json_decision.best_source == "spec_json"
    assert json_decision.mirror_share == 0.0
    for cohort, source in (("tool", "spec_tool"), ("refusal", "spec_refusal")):
        d = gate.decision(cohort)
        assert d.decision == "promote" and d.model == "merged" and d.retention == pytest.approx(1.0)
        assert d.fallback[0] == source and "base" in d.fallback


def test_inconclusive_drop_holds_on_the_best_source_and_mirrors():
    n = 40
    best = binary(0.8, n, 1)
    cand = best.copy()
    cand[np.flatnonzero(best)[:3]] = 0  # three rows lost: -0.075, interval straddles the margin
    spec = {"base": {"c": binary(0.3, n, 2)}, "src": {"c": best}, "merged": {"c": cand}}
    policy = Policy.model_validate({"default": {"max_drop": 0.05, "min_retention": 0.8, "mirror_share": 0.25}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.decision == "hold" and d.model == "src" and d.mirror_share == 0.25
    assert d.diff_low < -0.05 < d.diff_high
    assert any("interval" in reason for reason in d.reasons)


def test_min_score_blocks_promotion_even_without_a_drop():
    n = 50
    same = binary(0.3, n, 1)
    spec = {"base": {"c": same}, "src": {"c": same}, "merged": {"c": same}}
    policy = Policy.model_validate({"cohorts": {"c": {"min_score": 0.5}}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.decision == "hold" and any("min_score" in r for r in d.reasons)


def test_named_fallback_and_partial_cohort_overrides():
    policy = load_policy({"default": {"max_drop": 0.02, "min_retention": 0.95},
                          "cohorts": {"c": {"fallback": "base"}}})
    rule = policy.rule("c")
    assert rule.fallback == "base" and rule.max_drop == 0.02 and rule.min_retention == 0.95
    n = 60
    spec = {"base": {"c": binary(0.5, n, 1)}, "src": {"c": binary(0.9, n, 2)}, "merged": {"c": binary(0.1, n, 3)}}
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.decision == "reject" and d.model == "base"


def test_bootstrap_is_seeded():
    n = 80
    spec = {"base": {"c": binary(0.5, n, 1)}, "src": {"c": binary(0.7, n, 2)}, "merged": {"c": binary(0.6, n, 3)}}
    first = decide(results(spec), candidate="merged", base="base", sources=["src"]).decision("c")
    again = decide(results(spec), candidate="merged", base="base", sources=["src"]).decision("c")
    other = decide(results(spec), candidate="merged", base="base", sources=["src"],
                   policy=Policy(seed=9)).decision("c")
    assert (first.diff_low, first.diff_high) == (again.diff_low, again.diff_high)
    assert (first.diff_low, first.diff_high) != (other.diff_low, other.diff_high)


def test_policy_errors_name_the_field(tmp_path):
    with pytest.raises(PolicyError, match=r"cohorts.json.max_dorp: Extra inputs are not permitted"):
        load_policy({"cohorts": {"json": {"max_dorp": 0.1}}})
    with pytest.raises(PolicyError, match=r"default.min_score: Input should be less than or equal to 1"):
        load_policy({"default": {"min_score": 3}})
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "nope.yaml")
    n = 10
    spec = {"base": {"c": binary(0.5, n, 1)}, "src": {"c": binary(0.5, n, 2)}, "merged": {"c": binary(0.5, n, 3)}}
    with pytest.raises(PolicyError, match="falls back to 'ghost', which is not a source"):
        decide(results(spec), candidate="merged", base="base", sources=["src"],
               policy=load_policy({"cohorts": {"c": {"fallback": "ghost"}}}))


def test_unpaired_results_are_refused():
    spec = {"base": {"c": binary(0.5, 10, 1)}, "src": {"c": binary(0.5, 9, 2)}, "merged": {"c": binary(0.5, 10, 3)}}
    from mergegate import MergegateError

    with pytest.raises(MergegateError, match="model 'src' has no result for row"):
        decide(results(spec), candidate="merged", base="base", sources=["src"])
