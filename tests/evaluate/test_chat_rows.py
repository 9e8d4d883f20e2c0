"""Chat rows (`messages` instead of `prompt`): parsed and refused like every suite row, rendered in process with
the model's chat template (its BOS not doubled), POSTed to a server's /chat/completions. Servers listen on
127.0.0.1 only."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, SuiteError, evaluate_models, load_suite
from mergegate.evaluate import local as local_module
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
JSON_MODEL = DEMO / "models" / "json_output"
FAST = EndpointSettings(concurrency=2, timeout_s=30, retries=1, backoff_s=0.05)


def _demo_json_rows(count: int = 3) -> list[dict]:
    rows = [json.loads(line) for line in (DEMO / "suite.jsonl").read_text().splitlines()]
    return [row for row in rows if row["cohort"] == "json_output"][:count]


def _as_chat(row: dict) -> dict:
    """The same case asked as a one-message chat."""
    chat = {key: value for key, value in row.items() if key != "prompt"}
    return {**chat, "id": row["id"] + "-chat", "messages": [{"role": "user", "content": row["prompt"]}]}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BASE_ROW = {"id": "a", "cohort": "c", "expected": "42", "evaluators": ["exact_match"]}


def test_a_chat_row_parses_and_asks_its_messages(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "6*7="}]
    suite = load_suite(_write(tmp_path / "s.jsonl", [{**BASE_ROW, "messages": messages},
                                                      {**BASE_ROW, "id": "b", "prompt": "6*7="}]))
    chat, prompt = suite.rows
    assert chat.prompt is None and chat.chat() == messages
    assert chat.asked == "system: be brief\nuser: 6*7="
    assert prompt.messages is None and prompt.chat() is None and prompt.asked == "6*7="


def test_bad_chat_rows_are_reported_together_by_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        {**BASE_ROW, "prompt": "p"},
        {**BASE_ROW, "id": "both", "prompt": "p", "messages": [{"role": "user", "content": "p"}]},
        {**BASE_ROW, "id": "neither"},
        {**BASE_ROW, "id": "role", "messages": [{"role": "tool", "content": "p"}]},
        {**BASE_ROW, "id": "content", "messages": [{"role": "user", "content": 5}]},
        {**BASE_ROW, "id": "empty", "messages": []},
        {**BASE_ROW, "id": "extra", "messages": [{"role": "user", "content": "p", "name": "x"}]},
    ])
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    message = str(caught.value)
    assert "6 malformed row(s)" in message
    assert "line 2: row: a row needs exactly one of 'prompt' (text) or 'messages'" in message
    assert "line 3: row: a row needs exactly one of 'prompt'" in message
    assert "line 4: messages.0.role: Input should be 'system', 'user' or 'assistant'" in message
    assert "line 5: messages.0.content: Input should be a valid string" in message
    assert "line 6: messages: " in message and "at least 1 item" in message
    assert "line 7: messages.0.name: Extra inputs are not permitted" in message


_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", "User"]),
                           "content": st.one_of(st.text(max_size=6), st.integers(), st.none())},
                          optional={"name": st.text(max_size=3)}),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), st.text(max_size=4), max_size=3),
    st.text(max_size=4), st.integers(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.one_of(st.lists(_MESSAGE, max_size=4), _MESSAGE, st.none()),
       prompt=st.one_of(st.none(), st.text(max_size=4)))
def test_near_valid_messages_are_a_chat_row_or_a_suite_error(tmp_path, messages, prompt):
    row = {**BASE_ROW, **({"messages": messages} if messages is not None else {}),
           **({"prompt": prompt} if prompt is not None else {})}
    path = _write(tmp_path / "s.jsonl", [row])
    valid = (prompt is None) != (messages is None) and (messages is None or (
        isinstance(messages, list) and messages and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            and isinstance(m["content"], str) for m in messages)))
    try:
        (parsed,) = load_suite(path).rows
    except SuiteError as exc:
        assert not valid and str(exc).startswith(f"suite {path}: line 1: ")
    else:
        assert valid and parsed.chat() == messages and parsed.prompt == prompt
        assert parsed.asked == (prompt if prompt is not None else
                                "\n".join(f"{m['role']}: {m['content']}" for m in messages))


def test_the_demo_chat_template_is_bos_and_text_and_bos_is_not_doubled():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(JSON_MODEL)
    prompt = _demo_json_rows(1)[0]["prompt"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == tokenizer.bos_token + prompt
    assert tokenizer(rendered)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # what encoding it naively does
    from mergegate.evaluate.suite import SuiteRow

    chat = SuiteRow.model_validate(_as_chat(_demo_json_rows(1)[0]))
    plain = SuiteRow.model_validate(_demo_json_rows(1)[0])
    assert local_module._prompt_ids(tokenizer, chat, "m") == local_module._prompt_ids(tokenizer, plain, "m")
    assert local_module._prompt_ids(tokenizer, chat, "m").count(tokenizer.bos_token_id) == 1


def test_prompt_rows_encode_as_the_tokenizer_pads_them():
    """Prompt rows keep their answers (and RUNNER_FORMAT): ids encoded one by one and left-padded here are the
    tokenizer's own padded batch, ids and mask."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(JSON_MODEL)
    tokenizer.padding_side = "left"
    suite = load_suite(DEMO / "suite.jsonl")
    rows = [suite.rows[0], suite.rows[-1], *suite.by_cohort("json_output")[:3]]
    theirs = tokenizer([row.prompt for row in rows], return_tensors="pt", padding=True)
    mine = local_module._left_padded([local_module._prompt_ids(tokenizer, row, "m") for row in rows],
                                      tokenizer.pad_token_id)
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert mine["attention_mask"].tolist() == theirs["attention_mask"].tolist()


@pytest.fixture(scope="module")
def chat_suite(tmp_path_factory):
    rows = _demo_json_rows(3)
    rows = rows + [{**_as_chat(rows[0]), "evaluators": [*rows[0]["evaluators"], "perplexity"]},
                   *(_as_chat(row) for row in rows[1:])]
    return load_suite(_write(tmp_path_factory.mktemp("chat") / "suite.jsonl", rows))


@pytest.mark.slow
def test_in_process_a_chat_row_answers_as_its_prompt_row(chat_suite, tmp_path):
    runs = evaluate_models([(ModelRef("json_output", JSON_MODEL), "candidate")], chat_suite,
                           Registry(tmp_path / "r.sqlite"),
                           EvalOptions(max_new_tokens=24, progress=False, device="cpu"))
    by_id = {r.row_id: r for r in runs["json_output"].results}
    for row in _demo_json_rows(3):
        plain, chat = by_id[row["id"]], by_id[row["id"] + "-chat"]
        assert chat.output == plain.output
        assert {k: v for k, v in chat.details.items() if k != "perplexity"} == plain.details
        assert chat.prompt_tokens == plain.prompt_tokens  # one BOS, not two
    assert by_id[_demo_json_rows(1)[0]["id"] + "-chat"].details["perplexity"]["score"] > 0
    assert any(r.passed for r in by_id.values())


def test_a_chat_row_for_a_model_without_a_chat_template_is_refused_before_generation(chat_suite, tmp_path):
    folder = tmp_path / "no_template"
    shutil.copytree(JSON_MODEL, folder)
    (folder / "chat_template.jinja").unlink()
    registry = Registry(tmp_path / "r.sqlite")
    with pytest.raises(EvaluationError, match=r"model 'plain': row json_output-\d+-chat is a chat \(messages\), "
                                              "but the model's tokenizer has no chat template"):
        evaluate_models([(ModelRef("plain", folder), "candidate")], chat_suite, registry,
                        EvalOptions(progress=False, device="cpu"))
    assert registry._read("SELECT COUNT(*) AS n FROM eval_runs")[0]["n"] == 0  # refused before any run was opened


class _ChatOnly:
    """A tiny OpenAI-compatible server answering /v1/chat/completions only (a prompt sent to /v1/completions
    gets 404), recording each body it was sent."""

    def __init__(self):
        from fastapi import FastAPI

        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        app = self.app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}

        @app.post("/v1/chat/completions")
        def chat(body: dict):
            with self.lock:
                self.bodies.append(body)
            return {"id": "x", "object": "chat.completion", "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


@pytest.mark.slow
def test_a_chat_row_is_posted_to_chat_completions_and_scored(tmp_path):
    from mergegate.gateway.testing import ServerThread

    server = _ChatOnly()
    messages = [{"role": "system", "content": "numbers only"}, {"role": "user", "content": "6*7="}]
    suite = load_suite(_write(tmp_path / "s.jsonl", [{**BASE_ROW, "messages": messages}]))
    with ServerThread(server.app) as running:
        runs = evaluate_models([(ModelRef("m", url=running.url + "/v1"), "candidate")], suite,
                               Registry(tmp_path / "r.sqlite"),
                               EvalOptions(max_new_tokens=16, progress=False, endpoint=FAST))
    (result,) = runs["m"].results
    assert result.output == "42" and result.passed and (result.prompt_tokens, result.completion_tokens) == (5, 1)
    (body,) = server.bodies
    assert body == {"model": "m", "messages": messages, "max_tokens": 16, "temperature": 0, "n": 1, "stream": False}


@pytest.mark.slow
def test_through_the_gateway_a_chat_row_answers_as_in_process(chat_suite, tmp_path):
    """The gateway renders a chat with the same template: its /chat/completions answers match the runner's."""
    from mergegate.gateway import create_app
    from mergegate.gateway.testing import ServerThread
    from mergegate.rollout import RolloutPlan

    plan = RolloutPlan.model_validate({"candidate": "json_output", "models": {
        "json_output": {"role": "candidate", "path": str(JSON_MODEL)}}, "routes": {},
        "default": {"model": "json_output"}})
    registry = Registry(tmp_path / "r.sqlite")
    chats = load_suite(_write(tmp_path / "chats.jsonl", [_as_chat(row) for row in _demo_json_rows(3)]))
    local = ModelRef("local", JSON_MODEL)
    with ServerThread(create_app(plan, registry=Registry(tmp_path / "gateway.sqlite"))) as server:
        remote = ModelRef("remote", url=server.url + "/v1", served_model="json_output")
        runs = evaluate_models([(local, "source"), (remote, "candidate")], chats, registry,
                               EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST, device="cpu"))
    assert [r.output for r in runs["local"].results] == [r.output for r in runs["remote"].results]
    assert [r.prompt_tokens for r in runs["local"].results] == [r.prompt_tokens for r in runs["remote"].results]
