"""The gateway's upstream backend takes what an upstream sends back within the bounds every caller of an
OpenAI-compatible server is held to (serving.bounds): a whole non-streamed call within the backend's timeout however
slowly its bytes come, an answer no larger than its max_tokens allows, a streamed line no longer than that, and
usage counts that are whole numbers >= 0. The upstreams here are raw HTTP on 127.0.0.1, answering as no
well-behaved server would."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from mergegate.gateway.backends import RemoteBackend
from mergegate.gateway.errors import BackendBadResponse, BackendTimeout
from mergegate.gateway.protocol import Completion, GenParams, GenRequest

pytestmark = pytest.mark.slow  # each test starts a server

REQUEST = GenRequest("text_completion", GenParams(max_tokens=8), prompt="2+2=")
HUGE = 3 * 1024 * 1024  # far past what 8 tokens allow


def _completion(usage: dict | None = None) -> bytes:
    return json.dumps({"id": "x", "object": "text_completion", "model": "m",
                       "choices": [{"index": 0, "text": "4", "finish_reason": "stop"}],
                       "usage": usage or {"prompt_tokens": 3, "completion_tokens": 1}}).encode()


def _send(handler: BaseHTTPRequestHandler, body: bytes, *, content_type: str = "application/json",
          trickle: float = 0.0) -> None:
    handler.send_response(200)
    handler.send_header("content-type", content_type)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    if not trickle:
        handler.wfile.write(body)
        return
    for i in range(len(body)):
        handler.wfile.write(body[i:i + 1])
        handler.wfile.flush()
        time.sleep(trickle)


class _Raw:
    """A raw HTTP/1.1 upstream: every POST is answered by `answer(handler)`."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):  # the backend gave up on it
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _call(answer: Callable[[BaseHTTPRequestHandler], None], *, stream: bool = False, timeout: float = 30.0):
    """What the backend makes of one call to an upstream answering with `answer`: its Completion, or its error."""
    raw = _Raw(answer)

    async def go():
        backend = RemoteBackend("up", raw.url, timeout=timeout)
        await backend.start()
        try:
            if not stream:
                return await backend.generate(REQUEST)
            return [part async for part in backend.stream(REQUEST) if isinstance(part, Completion)][-1]
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    finally:
        raw.close()


def test_an_upstream_trickling_its_answer_is_a_timeout_not_a_wait_without_end():
    body = b" " * 400 + _completion()  # 40 s of bytes, each well within any read timeout
    with pytest.raises(BackendTimeout, match="no complete answer within 2 s"):
        _call(lambda h: _send(h, body, trickle=0.1), timeout=2.0)


def test_an_answer_past_what_max_tokens_allows_is_refused():
    body = b" " * HUGE + _completion()
    with pytest.raises(BackendBadResponse, match=r"the answer passed [\d,]+ bytes, the most accepted for 8 tokens"):
        _call(lambda h: _send(h, body))


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_that_are_not_whole_numbers_at_least_zero_are_refused(stream):
    usage = {"prompt_tokens": -5, "completion_tokens": 1}
    if stream:
        chunk = json.dumps({"id": "x", "choices": [{"index": 0, "text": "4", "finish_reason": "stop"}],
                            "usage": usage})
        answer = lambda h: _send(h, f"data: {chunk}\n\ndata: [DONE]\n\n".encode(), content_type="text/event-stream")
    else:
        answer = lambda h: _send(h, _completion(usage))  # noqa: E731
    with pytest.raises(BackendBadResponse, match=r"usage.prompt_tokens is -5, not a whole number"):
        _call(answer, stream=stream)


def test_a_streamed_line_past_what_max_tokens_allows_is_refused():
    line = b"data: " + b" " * HUGE + b"\n\ndata: [DONE]\n\n"
    with pytest.raises(BackendBadResponse, match=r"a stream line passed [\d,]+ bytes"):
        _call(lambda h: _send(h, line, content_type="text/event-stream"), stream=True)


def _tokenize(answer: Callable[[BaseHTTPRequestHandler], None], *, timeout: float = 30.0):
    """What the gateway's /tokenize relay makes of an upstream answering with `answer`: its answer, or its error."""
    from mergegate.gateway.tokenize import TokenizeRequest, tokenize

    raw = _Raw(answer)

    async def go():
        backend = RemoteBackend("up", raw.url, timeout=timeout)
        await backend.start()
        try:
            return await tokenize(backend, TokenizeRequest(model="up", prompt="2+2="))
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    finally:
        raw.close()


def test_a_tokenize_upstream_trickling_its_answer_is_a_timeout_not_a_wait_without_end():
    from mergegate.gateway.errors import APIError

    body = b" " * 400 + json.dumps({"count": 1, "tokens": [7]}).encode()
    with pytest.raises(APIError, match="no complete answer to /tokenize within 2 s"):
        _tokenize(lambda h: _send(h, body, trickle=0.1), timeout=2.0)


def test_a_tokenize_answer_past_what_the_prompt_allows_is_refused():
    from mergegate.gateway.errors import APIError

    body = json.dumps({"count": 1, "tokens": [7] * (HUGE // 2)}).encode()
    with pytest.raises(APIError, match=r"/tokenize: the answer passed [\d,]+ bytes"):
        _tokenize(lambda h: _send(h, body))


def test_a_tokenize_answer_within_its_bound_is_passed_on():
    assert _tokenize(lambda h: _send(h, json.dumps({"count": 3, "tokens": [1, 2, 3]}).encode()))["tokens"] == [1, 2, 3]
