"""hallucination on a labelled set (tests/evaluate/data/hallucination_labelled.jsonl, written for this purpose).

Each row has a `split`: the default threshold is calibrated on the `calibration` rows only (the threshold that
classifies them best; with a tie, the middle of the best interval), and accuracy is asserted on the `heldout` rows.
The split alternates rows within each topic and label (unsupported claims counted apart), and the four known
failures of `groundedness` are held out. Measured: calibration 1.00 (48 rows), held-out 0.89 (37 rows);
groundedness on the same rows 0.65 and 0.46.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergegate.evaluate.evaluators import Groundedness, Hallucination, Observation, check_claims
from mergegate.evaluate.suite import SuiteError, SuiteRow

DATA = Path(__file__).parent / "data" / "hallucination_labelled.jsonl"
HELD_OUT_FLOOR = 0.85


def labelled() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def suite_row(context: str, *evaluators: str) -> SuiteRow:
    return SuiteRow.model_validate({"id": "h", "cohort": "c", "prompt": "Q", "expected": "",
                                    "evaluators": list(evaluators or ["hallucination"]), "context": context})


@pytest.fixture(scope="module")
def verdicts() -> list[tuple[dict, bool, bool, float, bool]]:
    """(row, truly grounded, hallucination's verdict, its weakest-claim similarity or -1 after a rule fired,
    groundedness' verdict) for each labelled row."""
    out = []
    for item in labelled():
        row = suite_row(item["context"], "hallucination", "groundedness")
        obs = Observation(item["answer"])
        checks = check_claims(item["answer"], item["context"])
        support = -1.0 if any(c.problems for c in checks) else min(c.support for c in checks)
        out.append((item, item["label"] == "grounded", Hallucination()(row, obs).passed, support,
                    Groundedness()(row, obs).passed))
    return out


def accuracy(verdicts, split: str, which: int = 2) -> float:
    chosen = [v for v in verdicts if v[0]["split"] == split]
    return sum(v[which] == v[1] for v in chosen) / len(chosen)


def test_labelled_set_is_varied_and_split():
    rows = labelled()
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    assert {r["label"] for r in rows} == {"grounded", "hallucinated"}
    assert {r["split"] for r in rows} == {"calibration", "heldout"}
    kinds = {r["kind"].split(":")[0] for r in rows}
    assert {"number", "date", "name", "negation", "paraphrase", "partial", "unsupported", "known"} <= kinds


@pytest.mark.slow
def test_default_threshold_is_the_one_calibration_picks(verdicts):
    calibration = [(grounded, support) for item, grounded, _, support, _ in verdicts if item["split"] == "calibration"]
    supports = sorted({s for _, s in calibration if s >= 0})
    candidates = [(a + b) / 2 for a, b in zip(supports, supports[1:])]

    def correct(t):
        return sum((s >= t) == grounded for grounded, s in calibration)

    best = max(correct(t) for t in candidates)
    chosen = [t for t in candidates if correct(t) == best]
    middle = (min(chosen) + max(chosen)) / 2
    assert abs(Hallucination().threshold - middle) < 0.01, middle
    assert best / len(calibration) == 1.0


@pytest.mark.slow
def test_held_out_accuracy_and_groundedness_beside_it(verdicts):
    held_out = accuracy(verdicts, "heldout")
    print(f"hallucination: calibration {accuracy(verdicts, 'calibration'):.3f}, held-out {held_out:.3f}; "
          f"groundedness: {accuracy(verdicts, 'calibration', 4):.3f}, {accuracy(verdicts, 'heldout', 4):.3f}")
    assert held_out >= HELD_OUT_FLOOR
    assert accuracy(verdicts, "heldout", 4) < held_out


@pytest.mark.slow
def test_the_four_known_groundedness_failures_are_now_right(verdicts):
    known = [v for v in verdicts if v[0]["kind"].startswith("known")]
    assert len(known) == 4
    for item, grounded, verdict, _, old_verdict in known:
        assert verdict == grounded, item["answer"]
        assert old_verdict != grounded, item["answer"]  # groundedness gets each of them wrong


@pytest.mark.slow
@pytest.mark.parametrize(("answer", "reason"), [
    ("The tower was built in 1901 and is 300 metres tall.", "number 1901 not in context; number 300 not in context"),
    ("It was designed by the company of Gustave Flaubert.", "name 'Flaubert' not in context"),
    ("The Eiffel Tower is a lattice tower, not in Paris.", "negates what the context says otherwise"),
    ("It was finished in May 1889.", "date May not in context"),
    ("Bananas grow in tropical climates.", "is not supported by the context: similarity"),
])
def test_reasons_name_the_failing_claim(answer, reason):
    context = labelled()[0]["context"]
    result = Hallucination()(suite_row(context), Observation(answer))
    assert not result.passed and reason in result.reason


@pytest.mark.slow
def test_supported_answer_passes_with_its_weakest_similarity():
    context = labelled()[0]["context"]
    result = Hallucination()(suite_row(context), Observation("The tower is 330 metres tall. The Eiffel Tower stands in Paris."))
    assert result.passed and result.reason.startswith("2 claim(s) supported")


def test_hallucination_needs_a_context_and_an_output():
    with pytest.raises(ValueError, match="evaluator 'hallucination' needs a 'context'"):
        SuiteRow.model_validate({"id": "h", "cohort": "c", "prompt": "Q", "expected": "",
                                 "evaluators": ["hallucination"]})
    result = Hallucination()(suite_row("Some context."), Observation("  "))
    assert (result.passed, result.reason) == (False, "empty output")
    unvalidated = SuiteRow.model_construct(id="h", cohort="c", prompt="Q", expected="", evaluators=("hallucination",),
                                           context=None)
    with pytest.raises(SuiteError, match="needs a 'context'"):
        Hallucination()(unvalidated, Observation("x"))
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        Hallucination(threshold=2.0)
