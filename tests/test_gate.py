"""Gate decisions on constructed per-row results."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate import MergegateError
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
    same = binary(0.45, n, 1)  # below 0.5, but the interval of its mean reaches above it: not established
    spec = {"base": {"c": same}, "src": {"c": same}, "merged": {"c": same}}
    policy = Policy.model_validate({"cohorts": {"c": {"min_score": 0.5}}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.candidate_low < d.candidate_mean < 0.5 < d.candidate_high
    assert d.decision == "hold" and d.mirror_share == 0.1 and any("min_score" in r for r in d.reasons)


def test_a_score_established_below_min_score_rejects_without_mirroring():
    n = 50
    same = binary(0.3, n, 1)  # no drop against any source, but the whole interval of its mean is below 0.5
    spec = {"base": {"c": same}, "src": {"c": same}, "merged": {"c": same}}
    policy = Policy.model_validate({"cohorts": {"c": {"min_score": 0.5}}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.diff_low == d.diff_high == 0.0 and d.candidate_high < 0.5
    assert d.decision == "reject" and d.model == "src" and d.mirror_share == 0.0
    assert d.reasons[-1].startswith("score below min_score established: the candidate's 95% interval [")
    # the same scores on fewer rows than min_rows: not enough evidence to reject, so hold
    few = {name: {"c": scores["c"][:19]} for name, scores in spec.items()}
    d = decide(results(few), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.candidate_high < 0.5 and d.decision == "hold"


def test_the_candidate_interval_uses_the_same_resamples_as_the_difference():
    # the best source scores 1 on every row, so diff = candidate - 1 on every resample: the two intervals
    # are the same interval shifted by one only if they come from the same resampled rows
    n = 40
    cand = binary(0.6, n, 3)
    spec = {"base": {"c": np.zeros(n)}, "src": {"c": np.ones(n)}, "merged": {"c": cand}}
    d = decide(results(spec), candidate="merged", base="base", sources=["src"]).decision("c")
    assert d.candidate_low < d.candidate_high
    assert (d.diff_low, d.diff_high) == (pytest.approx(d.candidate_low - 1), pytest.approx(d.candidate_high - 1))


def test_named_fallback_and_partial_cohort_overrides():
    policy = load_policy({"default": {"max_drop": 0.02, "min_retention": 0.95},
                          "cohorts": {"c": {"fallback": "base"}}})
    rule = policy.rule("c")
    assert rule.fallback == "base" and rule.max_drop == 0.02 and rule.min_retention == 0.95
    n = 60
    spec = {"base": {"c": binary(0.5, n, 1)}, "src": {"c": binary(0.9, n, 2)}, "merged": {"c": binary(0.1, n, 3)}}
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.decision == "reject" and d.model == "base"


def test_a_policy_for_some_cohorts_judges_them_as_the_whole_policy_does():
    policy = load_policy({"default": {"max_drop": 0.02}, "default_route": "b",
                          "cohorts": {"a": {"max_drop": 0.3, "min_rows": 5}, "b": {"fallback": "base"}}})
    only_a = policy.for_cohorts(["a"])
    assert set(only_a.cohorts) == {"a"} and only_a.default_route is None and only_a.rule("a") == policy.rule("a")
    assert policy.for_cohorts(["b"]).default_route == "b" and policy.for_cohorts(["a", "b"]) == policy
    assert policy.for_cohorts([]).sha256 == load_policy({"default": {"max_drop": 0.02}}).sha256
    # results on cohort a alone (a trial cut short): the whole policy names b, so it is refused; a's rule judges
    spec = {"base": {"a": binary(0.5, 40, 1)}, "src": {"a": binary(0.8, 40, 3)}, "merged": {"a": binary(0.7, 40, 4)}}
    with pytest.raises(PolicyError, match="'b' not in the suite"):
        decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy)
    written_for_a = load_policy({"default": {"max_drop": 0.02}, "cohorts": {"a": {"max_drop": 0.3, "min_rows": 5}}})
    assert (decide(results(spec), candidate="merged", base="base", sources=["src"], policy=only_a)
            == decide(results(spec), candidate="merged", base="base", sources=["src"], policy=written_for_a))


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



# --- fallback chains and cost bounds (issue 13) ---------------------------------------------------------------


def test_the_fallback_chain_ranks_sources_by_their_score_on_the_cohort_before_the_base():
    n = 60
    # the generalist (0.6) is no specialist here but far better than the base (0.25): it comes before the base
    spec = {"base": {"c": binary(0.25, n, 1)}, "specialist": {"c": binary(0.9, n, 2)},
            "weak": {"c": binary(0.4, n, 5)}, "generalist": {"c": binary(0.6, n, 3)}, "merged": {"c": binary(0.1, n, 4)}}
    sources = ["weak", "specialist", "generalist"]
    d = decide(results(spec), candidate="merged", base="base", sources=sources).decision("c")
    assert d.decision == "reject" and d.model == "specialist"
    assert d.fallback == ("generalist", "weak", "base")
    # a named fallback serves the cohort first; the chain after it is still ranked by score, the base last
    policy = load_policy({"cohorts": {"c": {"fallback": "weak"}}})
    d = decide(results(spec), candidate="merged", base="base", sources=sources, policy=policy).decision("c")
    assert d.model == "weak" and d.fallback == ("specialist", "generalist", "base")
    policy = load_policy({"cohorts": {"c": {"fallback": "base"}}})
    d = decide(results(spec), candidate="merged", base="base", sources=sources, policy=policy).decision("c")
    assert d.model == "base" and d.fallback == ("specialist", "generalist", "weak")
    # promoted: the candidate serves, the whole chain backs it, the candidate never in it
    spec["merged"] = spec["specialist"]
    d = decide(results(spec), candidate="merged", base="base", sources=sources).decision("c")
    assert d.decision == "promote" and d.model == "merged" and d.fallback == ("specialist", "generalist", "weak", "base")


def test_sources_tied_on_score_keep_the_order_given_in_the_chain():
    n = 40
    same = binary(0.7, n, 1)
    spec = {"base": {"c": binary(0.2, n, 2)}, "a": {"c": same}, "b": {"c": same}, "z": {"c": same},
            "merged": {"c": np.zeros(n)}}
    d = decide(results(spec), candidate="merged", base="base", sources=["z", "a", "b"]).decision("c")
    assert d.model == "z" and d.fallback == ("a", "b", "base")


def test_a_base_that_beats_sources_on_the_cohort_comes_before_them_in_the_chain():
    n = 60
    # on this cohort the specialist is best, the base (0.6) beats two sources that score nothing there
    spec = {"base": {"c": binary(0.6, n, 1)}, "json": {"c": binary(0.9, n, 2)}, "add": {"c": np.zeros(n)},
            "tool": {"c": np.zeros(n)}, "merged": {"c": np.zeros(n)}}
    sources = ["add", "tool", "json"]
    d = decide(results(spec), candidate="merged", base="base", sources=sources).decision("c")
    assert d.decision == "reject" and d.model == "json"
    assert d.fallback == ("base", "add", "tool")
    # a named fallback serves first; the rest still by score, the base among them
    policy = load_policy({"cohorts": {"c": {"fallback": "tool"}}})
    d = decide(results(spec), candidate="merged", base="base", sources=sources, policy=policy).decision("c")
    assert d.model == "tool" and d.fallback == ("json", "base", "add")
    # the base tied with a source: sources in the order given first, then the base
    spec["add"] = spec["base"]
    d = decide(results(spec), candidate="merged", base="base", sources=sources).decision("c")
    assert d.fallback == ("add", "base", "tool")


def cost_rows(model: str, scores, latencies, tokens) -> list[RowResult]:
    return [RowResult(f"c-{i}", "c", model, "h", "", 1, int(t), float(ms), float(s), s >= 0.5, {})
            for i, (s, ms, t) in enumerate(zip(scores, latencies, tokens))]


def _costed(cand_latency, cand_tokens, cand_scores=None, n=40):
    good = binary(0.8, n, 1)
    return {"base": cost_rows("base", binary(0.3, n, 2), [50.0] * n, [2] * n),
            "src": cost_rows("src", good, [50.0] * n, [2] * n),
            "merged": cost_rows("merged", good if cand_scores is None else cand_scores, cand_latency, cand_tokens)}


def test_a_candidate_over_the_p99_latency_bound_holds_instead_of_promoting():
    n = 40
    slow_tail = [100.0] * (n - 1) + [900.0]  # p99 (linear interpolation over 40 rows) is 588.0 ms
    policy = load_policy({"cohorts": {"c": {"max_p99_ms": 500}}})
    d = decide(_costed(slow_tail, [2] * n), candidate="merged", base="base", sources=["src"],
               policy=policy).decision("c")
    assert d.decision == "hold" and d.model == "src" and d.mirror_share == 0.1
    assert d.reasons == ("p99 latency 588.0 ms > max_p99_ms 500.0",)
    policy = load_policy({"cohorts": {"c": {"max_p99_ms": 588}}})  # on the bound: met
    assert decide(_costed(slow_tail, [2] * n), candidate="merged", base="base", sources=["src"],
                  policy=policy).decision("c").decision == "promote"
    assert decide(_costed(slow_tail, [2] * n), candidate="merged", base="base",  # no bound: promote
                  sources=["src"]).decision("c").decision == "promote"


def test_a_candidate_over_the_tokens_ratio_bound_holds_instead_of_promoting():
    n = 40
    policy = load_policy({"default": {"max_tokens_ratio": 1.5}})
    d = decide(_costed([50.0] * n, [4] * n), candidate="merged", base="base", sources=["src"],
               policy=policy).decision("c")
    assert d.decision == "hold" and d.reasons == ("completion tokens 4.0 per row, 2.00x src's 2.0 > max_tokens_ratio 1.5",)
    d = decide(_costed([50.0] * n, [3] * n), candidate="merged", base="base", sources=["src"],
               policy=policy).decision("c")
    assert d.decision == "promote"  # 1.5x: on the bound


def test_a_broken_cost_bound_never_softens_a_reject():
    n = 40
    policy = load_policy({"default": {"max_p99_ms": 10, "max_tokens_ratio": 1.0}})
    d = decide(_costed([50.0] * n, [4] * n, cand_scores=np.zeros(n)), candidate="merged", base="base",
               sources=["src"], policy=policy).decision("c")
    assert d.decision == "reject" and d.mirror_share == 0.0
    assert any("max_p99_ms" in r for r in d.reasons) and any("max_tokens_ratio" in r for r in d.reasons)


def test_cost_bounds_are_part_of_the_policy_hash_only_when_set():
    assert load_policy({"default": {"max_p99_ms": None}}).sha256 == load_policy(None).sha256
    assert load_policy({"default": {"max_p99_ms": 200}}).sha256 != load_policy(None).sha256
    assert (load_policy({"cohorts": {"c": {"max_tokens_ratio": 2}}}).sha256
            != load_policy({"cohorts": {"c": {"min_rows": 20}}}).sha256)

# --- minimum evidence and boundaries (issue 12) -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_cohort_of_a_few_rows_holds_whatever_the_interval(n):
    perfect = np.ones(n)
    spec = {"base": {"c": np.zeros(n)}, "src": {"c": perfect}, "merged": {"c": perfect}}
    d = decide(results(spec), candidate="merged", base="base", sources=["src"]).decision("c")
    assert (d.diff_low, d.diff_high) == (0.0, 0.0)  # zero width: it proves nothing
    assert d.decision == "hold" and d.model == "src" and d.mirror_share == 0.1
    assert d.reasons[0] == f"only {n} row(s), below min_rows 20: too little evidence to decide"


def test_few_rows_never_establish_a_regression_either():
    spec = {"base": {"c": np.zeros(5)}, "src": {"c": np.ones(5)}, "merged": {"c": np.zeros(5)}}
    d = decide(results(spec), candidate="merged", base="base", sources=["src"]).decision("c")
    assert d.decision == "hold" and d.diff_high == -1.0


def test_min_rows_can_be_set_per_cohort():
    spec = {"base": {"c": np.zeros(5)}, "src": {"c": np.ones(5)}, "merged": {"c": np.ones(5)}}
    policy = load_policy({"cohorts": {"c": {"min_rows": 5}}})
    assert decide(results(spec), candidate="merged", base="base", sources=["src"],
                  policy=policy).decision("c").decision == "promote"


def test_a_bound_exactly_on_the_margin_is_decided_without_float_noise():
    # every row 0.1 below the best source: the interval is [-0.1, -0.1] in exact arithmetic (0.7 - 0.8 is
    # -0.10000000000000009 in floats); a lower bound equal to -max_drop is non-inferior, not a regression
    n = 40
    spec = {"base": {"c": np.full(n, 0.5)}, "src": {"c": np.full(n, 0.8)}, "merged": {"c": np.full(n, 0.7)}}
    policy = load_policy({"default": {"max_drop": 0.1, "min_retention": 0.875}})  # 0.7 / 0.8 = 0.875 exactly
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert (d.diff_low, d.diff_high, d.diff_mean) == (-0.1, -0.1, -0.1)
    assert d.decision == "promote", d.reasons


def test_the_decision_says_whether_a_drop_is_established_and_within_max_drop_at_the_gates_resolution():
    # every row 0.1 below the best source, and a max_drop of 0.0999999999: at the gate's 9 decimals the lower
    # bound sits on -max_drop, so the cohort is promoted, and its drop is established and tolerated
    n = 40
    spec = {"base": {"c": np.full(n, 0.5)}, "src": {"c": np.full(n, 0.8)}, "merged": {"c": np.full(n, 0.7)},
            "tie": {"c": np.full(n, 0.8)}}
    policy = load_policy({"default": {"max_drop": 0.0999999999, "min_retention": 0.875}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy).decision("c")
    assert d.decision == "promote" and d.drop_established and d.within_max_drop and d.tolerated_drop
    level = decide(results(spec), candidate="tie", base="base", sources=["src"], policy=policy).decision("c")
    assert not level.drop_established and level.within_max_drop and not level.tolerated_drop
    strict = load_policy({"default": {"max_drop": 0.05, "min_retention": 0.875}})
    d = decide(results(spec), candidate="merged", base="base", sources=["src"], policy=strict).decision("c")
    assert d.decision == "reject" and d.drop_established and not d.within_max_drop and not d.tolerated_drop


def test_the_decision_does_not_depend_on_the_order_of_the_results():
    n = 60
    spec = {"base": {"c": binary(0.5, n, 1), "d": binary(0.4, n, 4)}, "src": {"c": binary(0.8, n, 2), "d": binary(0.6, n, 5)},
            "merged": {"c": binary(0.75, n, 3), "d": binary(0.5, n, 6)}}
    ordered = results(spec)
    shuffled = {name: [rows[i] for i in np.random.default_rng(7).permutation(len(rows))]
                for name, rows in ordered.items()}
    shuffled["merged"] = [r for r in shuffled["merged"] if r.cohort == "c"] + [r for r in shuffled["merged"]
                                                                            if r.cohort == "d"]
    first = decide(ordered, candidate="merged", base="base", sources=["src"])
    again = decide(shuffled, candidate="merged", base="base", sources=["src"])
    assert first == again


# --- policy files (issue 18) ----------------------------------------------------------------------------------


def test_a_policy_naming_a_cohort_the_suite_lacks_is_refused():
    spec = {"base": {"json_output": binary(0.5, 20, 1)}, "src": {"json_output": binary(0.5, 20, 2)},
            "merged": {"json_output": binary(0.5, 20, 3)}}
    policy = load_policy({"cohorts": {"jsonoutput": {"max_drop": 0.01}}})
    with pytest.raises(PolicyError, match=r"cohort\(s\) 'jsonoutput' not in the suite \(the suite's cohorts: json_output\)"):
        decide(results(spec), candidate="merged", base="base", sources=["src"], policy=policy)


def test_a_default_route_naming_a_cohort_the_suite_lacks_is_refused():
    policy = load_policy({"default_route": "out_of_domian"})
    with pytest.raises(PolicyError, match=r"default_route 'out_of_domian' is not a cohort of the suite "
                                          r"\(the suite's cohorts: json_output, out_of_domain\)"):
        policy.check_cohorts(["json_output", "out_of_domain"])
    load_policy({"default_route": "out_of_domain"}).check_cohorts(["json_output", "out_of_domain"])


def test_an_unset_default_route_leaves_the_policy_hash_as_it_was():
    assert load_policy(None).sha256 == "6d186801567d6e61de2d774b1a0928e95bf8ee2c80363a7d9b7fa725b60ba5d7"
    assert load_policy({"default_route": "json_output"}).sha256 != load_policy(None).sha256


BAD_POLICIES = [
    ("default:\n  max_drop: [0.1\n", r"line 3, column 1: not valid YAML"),
    ("confidence: 0.95\n  bootstrap: 100\n", r"line 2, column 12: not valid YAML"),
    ("!!python/object/apply:os.system ['true']\n", r"line 1, column 1: not valid YAML \(could not determine a "
                                                    r"constructor for the tag 'tag:yaml.org,2002:python/object/apply"),
    ("- confidence\n- 0.9\n", r"expected a mapping of policy fields .*, got list"),
    ("just words\n", r"expected a mapping of policy fields .*, got str"),
    ("bootstrap: 1e9\n", r"bootstrap: Input should be a valid integer"),
    ("bootstrap: 1000000000\n", r"bootstrap: Input should be less than or equal to 100000"),
    ("bootstrap: 2000.5\n", r"bootstrap: Input should be a valid integer"),
    ("bootstrap: 10\n", r"bootstrap: Input should be greater than or equal to 100"),
    ("confidence: .nan\n", r"confidence: NaN is not a number"),
    ("seed: -1\n", r"seed: Input should be greater than or equal to 0"),
    ("default: {min_retention: .inf}\n", r"default.min_retention: Input should be a finite number"),
    ("default: {max_drop: '0.1'}\n", r"default.max_drop: Input should be a valid number"),
    ("default: {mirror_share: yes}\n", r"default.mirror_share: Input should be a valid number"),
    ("default: {min_rows: 0}\n", r"default.min_rows: Input should be greater than or equal to 1"),
    ("cohorts: {json: {max_dorp: 0.1}}\n", r"cohorts.json.max_dorp: Extra inputs are not permitted"),
    ("cohorts: [json]\n", r"cohorts: Input should be a valid dictionary"),
    ("thresholds: {}\n", r"thresholds: Extra inputs are not permitted"),
    ("default_route: 7\n", r"default_route: Input should be a valid string"),
    ("default: {max_p99_ms: 0}\n", r"default.max_p99_ms: Input should be greater than 0"),
    ("default: {max_p99_ms: .inf}\n", r"default.max_p99_ms: Input should be a finite number"),
    ("default: {max_p99_ms: '200'}\n", r"default.max_p99_ms: Input should be a valid number"),
    ("cohorts: {json: {max_tokens_ratio: -1}}\n", r"cohorts.json.max_tokens_ratio: Input should be greater than 0"),
    ("cohorts: {json: {max_tokens_ratio: .nan}}\n", r"cohorts.json.max_tokens_ratio: NaN is not a number"),
    ("cohorts: {json: {max_tokens_ratio: true}}\n", r"cohorts.json.max_tokens_ratio: Input should be a valid number"),
    ("default_route: ''\n", r"default_route: String should have at least 1 character"),
]


@pytest.mark.parametrize("text, message", BAD_POLICIES)
def test_bad_policy_files_are_refused_naming_the_file_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=f"^policy {path}: {message}"):
        load_policy(path)


def test_policy_encoding(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 3\n")  # a byte-order mark is fine
    assert load_policy(path).seed == 3
    path.write_bytes(b"seed: 3\n# caf\xe9\n")
    with pytest.raises(PolicyError, match=r"line 2: not valid UTF-8"):
        load_policy(path)
    path.write_text("")
    assert load_policy(path) == Policy()


def test_the_demo_policy_loads():
    from pathlib import Path

    policy = load_policy(Path(__file__).resolve().parents[1] / "examples" / "demo" / "policy.yaml")
    assert policy.rule("policy_refusal").max_drop == 0.05 and policy.rule("json_output").min_rows == 20
    assert policy.default_route == "out_of_domain"


# --- properties: any text is a policy or a PolicyError --------------------------------------------------------

_FIELDS = ["confidence", "bootstrap", "seed", "default", "cohorts", "min_score", "max_drop", "min_retention",
           "fallback", "mirror_share", "min_rows", "max_p99_ms", "max_tokens_ratio", "json_output", "!!python/object:os.system", "&a", "*a"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.sampled_from(["1e9", ".inf", ".nan", "0x10", "yes", "~", "[", "{", "!!binary x", "2001-01-01"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4)),
                       max_leaves=12)


def _check_policy_text(tmp_path, text: str | bytes) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        assert str(exc).startswith(f"policy {path}: ")
    else:
        assert isinstance(policy, Policy) and 100 <= policy.bootstrap <= 100_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(), st.binary()))
def test_any_text_is_a_policy_or_a_policy_error(tmp_path, text):
    _check_policy_text(tmp_path, text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=5), flow=st.booleans())
def test_any_yaml_mapping_is_a_policy_or_a_policy_error(tmp_path, data, flow):
    import yaml

    _check_policy_text(tmp_path, yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True))


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=5))
def test_any_dict_is_a_policy_or_a_policy_error(data):
    try:
        load_policy(data)
    except MergegateError as exc:
        assert isinstance(exc, PolicyError)
