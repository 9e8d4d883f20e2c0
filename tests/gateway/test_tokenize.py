"""`POST /tokenize` (vLLM's shape) on a live gateway over the shipped demo models: the model's own token ids,
404s for what it cannot tokenize, forwarding to an upstream's /tokenize, and the evaluation runner getting
the in-process budgets through it. Fixtures: tests/gateway/conftest.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

from ..evaluate.helpers import demo_rows

pytestmark = [pytest.mark.one_torch_thread, pytest.mark.slow]  # every test talks to a live server

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
BASE, JSON_OUTPUT = DEMO / "models" / "base", DEMO / "models" / "json_output"
TEXT = 'Return {"name": "Ada", "age": 36} as JSON.'


@pytest.fixture(scope="module")
def gw(launch, stub):
    """Two demo models in process, plus an upstream without /tokenize (the stub)."""
    return launch({"candidate": "json_output", "models": {
        "base": {"role": "base", "path": str(BASE)},
        "json_output": {"role": "candidate", "path": str(JSON_OUTPUT)},
        "stubbed": {"url": stub.url, "upstream_model": "primary"}},
        "routes": {"json": {"model": "json_output"}}, "default": {"model": "base"}})


@pytest.fixture(scope="module")
def relay(launch, gw):
    """A gateway whose model is `gw`'s base, reached over HTTP (a url upstream that has /tokenize)."""
    return launch({"candidate": "relayed", "models": {
        "relayed": {"role": "candidate", "url": gw.url + "/v1", "upstream_model": "base"}},
        "routes": {}, "default": {"model": "relayed"}})


def tokenize(gw, **body) -> httpx.Response:
    return httpx.post(gw.url + "/tokenize", json=body, timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_prompt_gets_the_models_own_ids_with_and_without_special_tokens(gw):
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    for special in (True, False):
        answer = tokenize(gw, model="base", prompt=TEXT, add_special_tokens=special)
        assert answer.status_code == 200, answer.text
        expected = tokenizer(TEXT, add_special_tokens=special)["input_ids"]
        assert answer.json() == {"count": len(expected), "max_model_len": 256, "tokens": expected}
    assert tokenize(gw, model="base", prompt=TEXT).json()["tokens"] == tokenizer(TEXT)["input_ids"]  # default: add
    with_special = tokenize(gw, model="base", prompt=TEXT).json()["tokens"]
    assert len(with_special) > len(tokenize(gw, model="base", prompt=TEXT, add_special_tokens=False).json()["tokens"])


def test_messages_are_rendered_with_the_chat_template(gw):
    tokenizer = AutoTokenizer.from_pretrained(JSON_OUTPUT)
    messages = [{"role": "user", "content": TEXT}]
    answer = tokenize(gw, model="json_output", messages=messages)
    assert answer.status_code == 200, answer.text
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert answer.json()["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_what_cannot_be_tokenized_is_an_openai_style_error(gw):
    error = _error(tokenize(gw, model="gpt-4o", prompt=TEXT), 404)
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"] and "base" in error["message"]
    error = _error(tokenize(gw, model="cohort/json", prompt=TEXT), 404)  # a route: which model's tokenizer?
    assert error["code"] == "model_not_found" and "is a route" in error["message"]
    error = _error(tokenize(gw, model="cohort/nothing", prompt=TEXT), 404)
    assert "cohort/" not in error["message"].split("Available:")[1]
    error = _error(tokenize(gw, model="stubbed", prompt=TEXT), 404)  # the stub has no /tokenize
    assert error["code"] == "tokenizer_not_available" and "stubbed" in error["message"]
    error = _error(tokenize(gw, model="base"), 400)
    assert "exactly one of 'prompt' and 'messages'" in error["message"]
    error = _error(tokenize(gw, model="base", prompt=TEXT, add_special_tokens="yes"), 400)
    assert error["param"] == "add_special_tokens"
    error = _error(httpx.post(gw.url + "/tokenize", content=b'{"model": "base", "prompt": ', timeout=10), 400)
    assert error["code"] == "invalid_json"


def test_a_url_model_is_tokenized_by_its_upstream(gw, relay):
    direct = tokenize(gw, model="base", prompt=TEXT, add_special_tokens=False).json()
    assert tokenize(relay, model="relayed", prompt=TEXT, add_special_tokens=False).json() == direct


def test_evaluation_through_the_gateway_gets_the_in_process_budgets_and_answers(gw, tmp_path):
    rows = demo_rows(per_cohort=2)
    # the demo models stop well inside every real row's budget: two rows whose short `expected` gives a budget
    # (2 * tokens + 8) below the answer's length, so that the budget is what ends them
    rows += [{**rows[i], "id": f"budget-bound-{i}", "expected": "{", "evaluators": ["exact_match"]}
             for i, row in enumerate(rows) if row["cohort"] == "json_output"]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    suite = load_suite(path)
    registry = Registry(tmp_path / "r.sqlite")
    local = ModelRef("local", JSON_OUTPUT)
    served = ModelRef("served", url=gw.url + "/v1", served_model="json_output")
    runs = evaluate_models([(local, "source"), (served, "candidate")], suite, registry,
                           EvalOptions(batch_size=1, max_new_tokens=64, progress=False, endpoint=EndpointSettings(concurrency=2, timeout_s=60, retries=0)))
    assert registry.run_config(runs["served"].run_id)["generation"]["budget"] == "tokenize"
    mine, theirs = runs["local"].results, runs["served"].results
    assert [r.row_id for r in mine] == [r.row_id for r in theirs]
    assert [r.output for r in mine] == [r.output for r in theirs]
    assert [r.completion_tokens for r in mine] == [r.completion_tokens for r in theirs]
    tokenizer = AutoTokenizer.from_pretrained(JSON_OUTPUT)
    budgets = {row["id"]: min(64, 2 * len(tokenizer(row["expected"], add_special_tokens=False)["input_ids"]) + 8)
               for row in rows}
    bound = [r for r in theirs if r.row_id.startswith("budget-bound-")]
    assert bound and all(r.completion_tokens == budgets[r.row_id] < 64 for r in bound)
    assert all(r.completion_tokens <= budgets[r.row_id] for r in theirs)


# -- a long prompt is refused before it is tokenized, and tokenizing never holds the event loop ----------------------

def test_a_prompt_longer_than_the_limit_is_refused_naming_it_before_tokenizing(gw):
    huge = "word " * 200_000  # 1,000,000 characters: under the body limit, far over the prompt's
    error = _error(tokenize(gw, model="base", prompt=huge), 400)
    assert error["param"] == "prompt" and "1000000 characters" in error["message"]
    assert "65536" in error["message"] and "max_prompt_chars" in error["message"]
    error = _error(tokenize(gw, model="json_output", messages=[{"role": "user", "content": huge}]), 400)
    assert error["param"] == "messages" and "max_prompt_chars" in error["message"]
    for path, body in (("/v1/completions", {"prompt": huge}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
        answer = httpx.post(gw.url + path, json={"model": "base", "max_tokens": 2, **body}, timeout=30)
        error = _error(answer, 400)
        assert error["code"] == "context_length_exceeded" and "max_prompt_chars" in error["message"]


class GatedTokenizer:
    """The model's own tokenizer, that tokenizes only once `gate` is set (`entered` is set once a call waits there):
    a tokenization as long as a test needs."""

    def __init__(self, tokenizer, gate: threading.Event):
        self._tokenizer, self._gate, self.entered = tokenizer, gate, threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self._gate.wait(60), "the gate was never opened"
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"prompt": TEXT}),
    ("/tokenize", {"messages": [{"role": "user", "content": TEXT}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 2}),
], ids=["tokenize-prompt", "tokenize-messages", "chat-prompt-count"])
def test_tokenizing_runs_off_the_event_loop(launch_each, path, body):
    gw = launch_each({"candidate": "json_output", "models": {"json_output": {"path": str(JSON_OUTPUT)}},
                      "routes": {}, "default": {"model": "json_output"}})
    backend = gw.gateway.backends["json_output"]
    real, gate = backend.tokenizer, threading.Event()
    backend.tokenizer = gated = GatedTokenizer(real, gate)
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(
        httpx.post(gw.url + path, json={"model": "json_output", **body}, timeout=90)))
    try:
        caller.start()
        assert gated.entered.wait(60), "the request never reached the tokenizer"
        # while that request's tokenization waits, the gateway still answers: it is not tokenizing on its loop
        assert httpx.get(gw.url + "/healthz", timeout=30).status_code == 200
    finally:
        gate.set()
        caller.join(90)
        backend.tokenizer = real
    assert answers and answers[0].status_code == 200, answers
