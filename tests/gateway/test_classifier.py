"""Classifier routing: a request with no cohort goes to the cohort whose eval-suite prompts it is nearest to
(MiniLM centroids), or to the default route when nothing is close."""

from __future__ import annotations

import json

import pytest

from mergegate.gateway import GatewayConfig

from .helpers import SQL, WEATHER, route_of

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]  # every test talks to a live server


@pytest.fixture(scope="module")
def gw(family, launch, tmp_path_factory):
    suite = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    rows = [{"id": f"{cohort}-{i}", "cohort": cohort, "prompt": prompt, "expected": "x",
             "evaluators": ["normalized_match"]}
            for cohort, prompts in (("weather", WEATHER), ("sql", SQL)) for i, prompt in enumerate(prompts)]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {
        "candidate": "ft3",
        "models": {"base": {"role": "base", "path": str(family["base"])}, "ft1": {"path": str(family["ft1"])},
                   "ft2": {"path": str(family["ft2"])}, "ft3": {"role": "candidate", "path": str(family["ft3"])}},
        "routes": {"weather": {"model": "ft1"}, "sql": {"model": "ft2"}},
        "default": {"model": "base"},
    }
    return launch(plan, suite=suite, config=GatewayConfig(classifier_threshold=0.35))


def route(gw, text: str, **headers) -> dict:
    response = gw.client().chat.completions.with_raw_response.create(
        model="mergegate", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        max_tokens=2, extra_headers=headers)
    return route_of(response.headers)


def test_prompts_like_a_cohorts_suite_prompts_go_to_that_cohort(gw):
    weather = route(gw, "Is it going to snow in Berlin on Friday?")
    assert (weather["cohort"], weather["source"], weather["model"]) == ("weather", "classifier", "ft1")
    sql = route(gw, "Write SQL to count orders grouped by region.")
    assert (sql["cohort"], sql["source"], sql["model"]) == ("sql", "classifier", "ft2")
    completion = gw.client().completions.with_raw_response.create(
        model="mergegate", prompt="Will there be thunderstorms in Chicago tonight?", max_tokens=2)
    assert route_of(completion.headers)["model"] == "ft1"


def test_unrelated_prompts_fall_below_the_threshold_to_the_default_route(gw):
    for text in ("My grandmother's apple pie recipe uses cinnamon and butter.",
                 "Tell me about the history of the Roman empire."):
        r = route(gw, text)
        assert (r["cohort"], r["source"], r["model"]) == ("default", "default", "base")


def test_an_explicit_cohort_beats_the_classifier(gw):
    r = route(gw, "Is it going to snow in Berlin on Friday?", **{"X-Cohort": "sql"})
    assert (r["cohort"], r["source"], r["model"]) == ("sql", "header", "ft2")
