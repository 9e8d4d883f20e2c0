"""Adapters on a shared base as candidates: the cohort's own adapter per row, and a learned router among the
adapters, evaluated like any model (answers as the separate `base+adapter` models give them, cached in the
registry), the router saved and read back picking and answering the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.adapter_router import AdapterRouter
from mergegate.evaluate.adapters import (
    AdapterCandidate,
    evaluate_adapter_candidate,
    held_parameter_bytes,
    load_shared,
    run_candidate_rows,
    train_router,
)
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

from ..helpers import make_lora, write_jsonl

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
BASE = DEMO / "models" / "base"
ROUTES = {"arithmetic": "arithmetic", "json_output": "noisy"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return {"arithmetic": DEMO / "models" / "arithmetic_lora",
            "noisy": make_lora(BASE, tmp_path_factory.mktemp("lora") / "noisy", seed=7)}


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    """Four rows of each demo cohort."""
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if seen.setdefault(row["cohort"], 0) < 4:
            seen[row["cohort"]] += 1
            rows.append(row)
    return load_suite(write_jsonl(tmp_path_factory.mktemp("suite") / "suite.jsonl", rows))


OPTIONS = EvalOptions(batch_size=4, max_new_tokens=16, progress=False)


@pytest.mark.slow
def test_the_cohorts_own_adapter_answers_as_the_separate_base_plus_adapter_model(tmp_path, adapters, small_suite):
    registry = Registry(tmp_path / "registry.sqlite")
    candidate = AdapterCandidate("adapter-routes", BASE, adapters, routes=ROUTES)
    run = evaluate_adapter_candidate(candidate, small_suite, registry, OPTIONS)
    separate = evaluate_models([(ModelRef("base", BASE), "base"),
                                (ModelRef("arithmetic", BASE, adapter=adapters["arithmetic"]), "source"),
                                (ModelRef("noisy", BASE, adapter=adapters["noisy"]), "source")],
                               small_suite, registry, OPTIONS)
    expected = {row.row_id: row.output for name in ("base", "arithmetic", "noisy") for row in separate[name].results
                if ROUTES.get(row.cohort, "base") == name}
    assert {row.row_id: row.output for row in run.results} == expected
    assert [r.row_id for r in run.results] == [row.id for row in small_suite.rows]
    # recorded like any model: the same candidate again is read from the registry
    again = evaluate_adapter_candidate(candidate, small_suite, registry, OPTIONS)
    assert again.cached and again.results == run.results
    # another mapping is another candidate
    other = AdapterCandidate("adapter-routes", BASE, adapters, routes={"arithmetic": "noisy"})
    assert other.model_hash() != candidate.model_hash()


def test_a_shared_base_holds_one_base_and_the_lora_matrices(adapters):
    shared, _ = load_shared(BASE, adapters)
    alone, _ = load_shared(BASE, {})
    lora = sum(p.numel() * p.element_size() for name, p in shared.named_parameters() if "lora_" in name)
    assert held_parameter_bytes(shared) == held_parameter_bytes(alone) + lora


@pytest.mark.slow
def test_a_router_trained_on_calibration_rows_reloads_and_answers_the_same(tmp_path, adapters, small_suite):
    model, tokenizer = load_shared(BASE, adapters)
    router = train_router(model, tokenizer, BASE, adapters, ROUTES, DEMO / "calibration.jsonl")
    assert router.choices == ("arithmetic", "noisy", "(base)")
    folder = router.save(tmp_path / "router")
    assert sorted(p.name for p in folder.iterdir()) == ["router.json", "router.safetensors"]
    loaded = AdapterRouter.load(folder)
    assert loaded.identity() == router.identity() and loaded.adapters == {n: p.resolve() for n, p in adapters.items()}

    answers = {}
    for name, chosen in (("trained", router), ("loaded", loaded)):
        got: list = []
        candidate = AdapterCandidate("router", BASE, adapters, router=chosen)
        run_candidate_rows(candidate, "h", small_suite.rows, batch_size=4, max_new_tokens=16, device="cpu",
                           on_results=got.extend)
        answers[name] = {r.row_id: r.output for r in got}
    assert answers["trained"] == answers["loaded"]
    # it learned the routes from the calibration rows: the suite's rows go to their cohort's adapter
    from mergegate.evaluate.adapters import prompt_features
    from mergegate.evaluate.local import _prompt_ids

    picks = loaded.pick(prompt_features(model, [_prompt_ids(tokenizer, row, "r") for row in small_suite.rows],
                                        tokenizer.pad_token_id))
    assert picks == [ROUTES.get(row.cohort) for row in small_suite.rows]


def test_a_router_file_that_is_not_one_is_refused_naming_it(tmp_path):
    (tmp_path / "router.json").write_text("{}")
    with pytest.raises(EvaluationError, match="adapter router .*router.json: cannot be read"):
        AdapterRouter.load(tmp_path)


def test_router_rows_must_name_their_cohort(tmp_path, adapters):
    model, tokenizer = load_shared(BASE, adapters)
    calibration = write_jsonl(tmp_path / "calibration.jsonl", [{"text": "1+1=2"}])
    with pytest.raises(EvaluationError, match="line 1: a router's rows need a 'cohort'"):
        train_router(model, tokenizer, BASE, adapters, ROUTES, calibration)
