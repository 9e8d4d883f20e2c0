"""What an OpenAI-compatible server sends back is taken only within bounds (evaluate.endpoint, serving.bounds): a
whole request within the model's timeout however slowly its bytes come, an answer no larger than what was asked
for allows, token counts that are whole numbers >= 0, and the model's API key never shown back. The servers here
are raw HTTP on 127.0.0.1, answering as no well-behaved framework would."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry
from mergegate.serving.bounds import AnswerTooLarge, answer_limit, read_limited, usage_counts

from ..helpers import write_jsonl

pytestmark = pytest.mark.slow  # each test starts a server

QUICK = EndpointSettings(concurrency=2, timeout_s=2, retries=0, backoff_s=0.05)  # for the trickling servers
PATIENT = EndpointSettings(concurrency=2, timeout_s=30, retries=0, backoff_s=0.05)  # ample on a busy machine


def _completion(text: str = "42", usage: object = None) -> bytes:
    answer = {"id": "x", "object": "text_completion", "model": "m",
              "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}
    answer["usage"] = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4} if usage is None else usage
    return json.dumps(answer).encode()


MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}).encode()


class _Raw:
    """A raw HTTP/1.1 server: `answers` maps a path to how it is answered — bytes (sent whole), or a callable
    given the handler that writes the answer itself. Unknown paths answer 404."""

    def __init__(self):
        self.answers: dict[str, object] = {"/v1/models": MODELS, "/v1/completions": _completion()}
        self.gone = threading.Event()  # set when a trickled or streamed answer's reader left
        raw = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self._answer()

            def _answer(self):
                answer = raw.answers.get(self.path.split("?")[0])
                if callable(answer):
                    try:
                        answer(self)
                    except (BrokenPipeError, ConnectionResetError):
                        raw.gone.set()
                    self.close_connection = True
                    return
                body = answer if isinstance(answer, bytes) else b'{"error": {"message": "no such path"}}'
                self.send_response(200 if isinstance(answer, bytes) else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _trickle(handler) -> None:
    """Headers, then one byte of a JSON answer every 0.5 s (for at most two minutes)."""
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", "100000")
    handler.end_headers()
    handler.wfile.flush()
    for _ in range(240):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.5)


def _huge(size: int):
    """A valid completion whose text is `size` bytes, streamed without a length, the connection closed after."""
    def answer(handler) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("connection", "close")
        handler.end_headers()
        head, tail = _completion("\0").split(b"\\u0000")
        handler.wfile.write(head)
        block = b"a" * 65536
        for _ in range(size // len(block)):
            handler.wfile.write(block)
        handler.wfile.write(tail)
    return answer


def _suite(tmp_path: Path):
    return load_suite(write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "cohort": "c", "prompt": "6*7=", "expected": "42",
                                                          "evaluators": ["exact_match"]}]))


def _evaluate_within(seconds: float, ref: ModelRef, tmp_path: Path, settings: EndpointSettings = PATIENT):
    """evaluate_models on a thread, its result or exception; fails the test if it has not returned in time."""
    registry = Registry(tmp_path / "r.sqlite")
    outcome: dict = {}

    def run():
        try:
            outcome["runs"] = evaluate_models([(ref, "candidate")], _suite(tmp_path), registry,
                                              EvalOptions(progress=False, endpoint=settings, max_new_tokens=64))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome, registry


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions"])
def test_a_server_sending_one_byte_at_a_time_is_stopped_at_the_timeout(tmp_path, path):
    with _Raw() as server:
        server.answers[path] = _trickle
        outcome, _ = _evaluate_within(60, ModelRef("m", url=server.url), tmp_path, QUICK)
    error = outcome.get("error")
    assert isinstance(error, EvaluationError), repr(outcome)[:500]
    assert "model 'm'" in str(error) and "no complete answer within 2 s" in str(error)


def test_an_answer_larger_than_its_request_allows_is_refused_and_not_stored(tmp_path):
    with _Raw() as server:
        server.answers["/v1/completions"] = _huge(8 * 1024 * 1024)
        outcome, registry = _evaluate_within(60, ModelRef("m", url=server.url), tmp_path)
    error = outcome.get("error")
    assert isinstance(error, EvaluationError), repr(outcome)[:500]
    message = str(error)
    assert "model 'm'" in message and "row a" in message and f"{answer_limit(64):,} bytes" in message
    assert "64 tokens" in message
    assert not registry._read("SELECT row_id FROM row_results", ())


@pytest.mark.parametrize("usage, shown", [
    ({"prompt_tokens": -5, "completion_tokens": 1}, "usage.prompt_tokens is -5"),
    ({"prompt_tokens": 3, "completion_tokens": -7}, "usage.completion_tokens is -7"),
    ({"prompt_tokens": "abc", "completion_tokens": 1}, "usage.prompt_tokens is 'abc'"),
    ({"prompt_tokens": 3, "completion_tokens": 1.5}, "usage.completion_tokens is 1.5"),
    ({"prompt_tokens": 3, "completion_tokens": True}, "usage.completion_tokens is True"),
    ({"prompt_tokens": 10**30, "completion_tokens": 1}, "usage.prompt_tokens is 1000000000000000000000000000000"),
    ([3, 1], "usage is [3, 1], not an object"),
])
def test_token_counts_that_are_not_whole_numbers_are_refused_naming_the_field(tmp_path, usage, shown):
    with _Raw() as server:
        server.answers["/v1/completions"] = _completion(usage=usage)
        outcome, registry = _evaluate_within(60, ModelRef("m", url=server.url), tmp_path)
    error = outcome.get("error")
    assert isinstance(error, EvaluationError), repr(outcome)[:500]
    assert "model 'm'" in str(error) and "row a" in str(error) and shown in str(error)
    assert "Traceback" not in str(error)
    assert not registry._read("SELECT row_id FROM row_results", ())


def test_whole_token_counts_are_stored_and_a_missing_count_is_zero(tmp_path):
    with _Raw() as server:
        server.answers["/v1/completions"] = _completion(usage={"prompt_tokens": 3.0, "completion_tokens": None})
        outcome, _ = _evaluate_within(60, ModelRef("m", url=server.url), tmp_path)
    (result,) = outcome["runs"]["m"].results
    assert (result.prompt_tokens, result.completion_tokens) == (3, 0)


def test_usage_counts_and_read_limited():
    import asyncio

    assert usage_counts(None) is None and usage_counts({}) == (0, 0)
    assert usage_counts({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}) == (2, 5)

    async def chunks(*parts):
        for part in parts:
            yield part

    assert asyncio.run(read_limited(chunks(b"ab", b"cd"), 4)) == b"abcd"
    assert asyncio.run(read_limited(chunks(b"ab", b"cdef"), 3, cut=True)) == b"abc"
    with pytest.raises(AnswerTooLarge, match="passed 3 bytes"):
        asyncio.run(read_limited(chunks(b"ab", b"cd"), 3))
