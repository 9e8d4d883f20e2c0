"""Evaluation through servers that speak their own dialects of the OpenAI API (evaluate.endpoint), each imitated
by the stub upstream (`gateway.testing.StubUpstream`, on 127.0.0.1): llama.cpp's `/tokenize` (it reads `content`,
vLLM's reads `prompt`) and its `meta` and `/props` identity, a server whose tokenization cannot be right,
`transformers serve` listing a model only once it is loaded, and a server's own timing beside the wall latency."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.gateway.testing import ServerThread, StubUpstream
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

pytestmark = pytest.mark.slow  # each test starts a server

FAST = EndpointSettings(concurrency=2, timeout_s=30, retries=1, backoff_s=0.05)
MAX_NEW = 32
EXPECTED = "abcdefghijkl"  # 3 of the stub's 4-character tokens: a row budget of 2 * 3 + 8
ROW_BUDGET = 14
LONG_REPLY = "x" * 400  # far past every budget: a row's completion tokens are its budget


@contextmanager
def served(dialect: str | None, **behavior):
    stub = StubUpstream(dialect=dialect)
    stub.set("m", reply=LONG_REPLY, **behavior)
    with ServerThread(stub.app) as server:
        stub.url = server.url + "/v1"  # type: ignore[attr-defined]
        yield stub


def suite(tmp_path, chat: bool = False):
    rows = [{"id": "p", "cohort": "c", "prompt": "spell it", "expected": EXPECTED, "evaluators": ["exact_match"]}]
    if chat:
        rows.insert(0, {"id": "q", "cohort": "c", "messages": [{"role": "user", "content": "spell it"}],
                        "expected": EXPECTED, "evaluators": ["exact_match"]})
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_suite(path)


def evaluate(url: str, tmp_path, registry: Registry, chat: bool = False):
    ref = ModelRef("m", url=url)
    options = EvalOptions(max_new_tokens=MAX_NEW, progress=False, endpoint=FAST)
    return evaluate_models([(ref, "candidate")], suite(tmp_path, chat), registry, options)["m"]


def budget_mode(registry: Registry, run) -> str:
    return registry.run_config(run.run_id)["generation"]["budget"]


# -- the token budget: each server's /tokenize, and never an answer that cannot be right -------------------


@pytest.mark.parametrize("dialect", ["vllm", "llama.cpp"])
def test_each_servers_tokenize_dialect_gives_the_rows_their_budgets(dialect, tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served(dialect) as stub:
        run = evaluate(stub.url, tmp_path, registry)
    assert [r.completion_tokens for r in run.results] == [ROW_BUDGET]
    assert budget_mode(registry, run) == "tokenize"


@pytest.mark.parametrize("answer", [{"tokens": []}, {"tokens": "ab"}, {"count": -3, "tokens": []},
                                    {"count": True}, ["not", "an", "object"]],
                         ids=["empty", "tokens-a-string", "negative-count", "count-a-bool", "not-an-object"])
def test_a_tokenization_that_cannot_be_right_falls_back_to_the_row_budget_and_says_so(answer, tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served("llama.cpp") as stub:
        stub.tokenize_answer = answer
        with pytest.warns(UserWarning, match=r"POST /tokenize.*every row gets max_new_tokens \(32\)"):
            run = evaluate(stub.url, tmp_path, registry)
        assert [r.completion_tokens for r in run.results] == [MAX_NEW]
        assert budget_mode(registry, run) == "max_new_tokens"
        stub.tokenize_answer = None  # the server counts again: the budget used is in the cache key
        again = evaluate(stub.url, tmp_path, registry)
    assert not again.cached and [r.completion_tokens for r in again.results] == [ROW_BUDGET]
    assert budget_mode(registry, again) == "tokenize"


def test_an_empty_expected_answer_may_count_no_tokens(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps({"id": "e", "cohort": "c", "prompt": "say nothing", "expected": "",
                                "evaluators": ["exact_match"]}) + "\n")
    registry = Registry(tmp_path / "r.sqlite")
    with served("llama.cpp") as stub:
        run = evaluate_models([(ModelRef("m", url=stub.url), "candidate")], load_suite(path), registry,
                              EvalOptions(max_new_tokens=MAX_NEW, progress=False, endpoint=FAST))["m"]
    assert [r.completion_tokens for r in run.results] == [8] and budget_mode(registry, run) == "tokenize"


# -- the model's identity: what the server reports of the weights behind an alias ---------------------------


META = {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576, "n_params": 134515008,
        "size": 144_000_000}


def test_weights_swapped_behind_the_same_alias_are_another_model(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    runs = {}
    for name, meta, path in [("first", META, "/m/base-q8_0.gguf"), ("same", META, "/m/base-q8_0.gguf"),
                             ("other-meta", {**META, "size": 98_000_000}, "/m/base-q8_0.gguf"),
                             ("other-file", META, "/m/merged-q8_0.gguf")]:
        with served("llama.cpp", card={"meta": meta}) as stub:
            stub.props = {"model_path": path, "total_slots": 1, "build_info": "b1-stub"}
            runs[name] = evaluate(stub.url, tmp_path, registry)
    assert runs["same"].cached and runs["same"].model_hash == runs["first"].model_hash  # `created` is left out
    for swapped in ("other-meta", "other-file"):
        assert not runs[swapped].cached and runs[swapped].model_hash != runs["first"].model_hash
    identity = json.loads(registry.model(runs["first"].model_hash)["provenance"])["endpoint"]
    assert identity["reported"]["meta"] == META and identity["props"]["model_path"] == "/m/base-q8_0.gguf"
    assert "created" not in identity["reported"]


def test_fields_a_server_stamps_per_call_are_not_part_of_the_identity(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served("vllm") as stub:  # `created` and a `permission` with a random id, new at every GET /models
        first, again = evaluate(stub.url, tmp_path, registry), evaluate(stub.url, tmp_path, registry)
    assert again.cached and again.model_hash == first.model_hash


# -- a model the server lists only once it is loaded ----------------------------------------------------------


def test_a_model_loaded_on_its_first_request_is_asked_for_before_refusing(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served("transformers") as stub:
        with pytest.warns(UserWarning, match=r"POST /tokenize gave no count .*\(HTTP 404\)"):  # it has none
            run = evaluate(stub.url, tmp_path, registry, chat=True)
        assert stub.calls["m"] == 1 + len(run.results)  # one request with a one-token budget, then the rows
        assert [r.completion_tokens for r in run.results] == [MAX_NEW, MAX_NEW]
        with pytest.warns(UserWarning, match="POST /tokenize"):
            assert evaluate(stub.url, tmp_path, registry, chat=True).cached
    identity = json.loads(registry.model(run.model_hash)["provenance"])["endpoint"]
    assert identity["reported"]["owned_by"] == "stub" and "status" not in identity["reported"]


def test_a_model_the_server_cannot_load_is_refused_naming_what_was_tried(tmp_path):
    with served("transformers", mode="fail", status=404) as stub:
        with pytest.raises(EvaluationError, match=r"does not serve 'm' \(it lists no models; a one-token request "
                                                  r"naming it answered HTTP 404: stub failure\)"):
            evaluate(stub.url, tmp_path, Registry(tmp_path / "r.sqlite"))


def test_a_model_answered_but_never_listed_is_evaluated_under_its_name_alone(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served(None, listed=False) as stub:
        with pytest.warns(UserWarning) as caught:
            run = evaluate(stub.url, tmp_path, registry)
    assert any("'m' answers but is not listed by the server" in str(w.message) for w in caught)
    assert [r.output for r in run.results] == [LONG_REPLY[:4 * MAX_NEW]]
    identity = json.loads(registry.model(run.model_hash)["provenance"])["endpoint"]
    assert identity == {"served_model": "m", "reported": "not listed by the server"}


# -- latency: the wall time, and the server's own timing where it reports one ----------------------------------


def test_the_servers_own_timing_is_kept_beside_the_wall_latency(tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with served("llama.cpp") as stub:
        run = evaluate(stub.url, tmp_path, registry, chat=True)
        cached = evaluate(stub.url, tmp_path, registry, chat=True)
    for r in run.results:
        assert r.server_ms == r.prompt_tokens * StubUpstream.PROMPT_MS + r.completion_tokens * StubUpstream.PREDICTED_MS
        assert r.latency_ms > 0
    assert cached.cached and [r.server_ms for r in cached.results] == [r.server_ms for r in run.results]


def test_a_server_that_reports_no_timing_leaves_it_empty(tmp_path):
    with served("vllm") as stub:
        run = evaluate(stub.url, tmp_path, Registry(tmp_path / "r.sqlite"))
    assert [r.server_ms for r in run.results] == [None] and run.results[0].latency_ms > 0
