"""Helpers for tests and benchmarks: a scriptable OpenAI-compatible upstream (`StubUpstream`) that can answer,
fail, hang or send invalid JSON — per model name — and speak the dialect of vLLM, llama.cpp's server or
`transformers serve`, served on 127.0.0.1 by `ServerThread` (from `serving.launcher`, importable from here too)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..serving.launcher import LOOPBACK, ServerThread

__all__ = ["LOOPBACK", "Behavior", "ServerThread", "StubUpstream"]


@dataclass(frozen=True)
class Behavior:
    """How the stub answers one model: mode ok | fail | hang | invalid_json | unauthorized (a 401 whose message
    quotes the bearer token it received, as some upstreams do) | stream_error (a stream that sends its first chunk,
    then an error event quoting the token)."""

    mode: str = "ok"
    reply: str = "stub reply"
    delay: float = 0.0  # seconds before an "ok" answer
    hang: float = 30.0  # seconds a "hang" lasts before it answers anyway (bounded, so shutdown never waits long)
    status: int = 500  # for "fail"
    interval: float = 0.0  # seconds between two streamed chunks
    # a reply per prompt (a chat's last user message, or a completion's prompt); other prompts get `reply`
    replies: dict[str, str] | None = None
    listed: bool = True  # in GET /v1/models (False: answered, never listed)
    card: dict | None = None  # more fields of its /v1/models entry (llama.cpp's `meta`)


class StubUpstream:
    """An OpenAI-compatible upstream whose answers a test scripts per model name (`set`) or for all (`set(None)`).

    Tokens are counted as 4-character chunks: the reply streams in such chunks and max_tokens cuts it.
    `calls` counts requests per model; `hung_up` counts those whose caller left during a delay or a hang.

    `dialect` imitates a server's own ways (None: none of them, POST /tokenize refused):
    - "vllm": /tokenize reads `prompt` (400 without) and answers `{count, max_model_len, tokens}`; each
      /v1/models entry is stamped per call (`created`, and a `permission` with a random id), as vLLM's are.
    - "llama.cpp": /tokenize reads `content` only (without it: `{"tokens": []}`, HTTP 200); /v1/models entries
      carry `created` per call and the model's `card` (its `meta`); a completion carries `timings` (`prompt_ms`,
      `predicted_ms`: PROMPT_MS and PREDICTED_MS per token); GET /props answers `props` when set.
    - "transformers" (`transformers serve`): no /tokenize; a model is listed (with a `status`) only once a
      request has named it, as that server loads a model on its first request.
    `tokenize_answer`, when set, is what /tokenize answers whatever it is asked (a dialect gone wrong)."""

    PROMPT_MS, PREDICTED_MS = 0.5, 2.0  # the llama.cpp dialect's reported milliseconds per token

    def __init__(self, default: Behavior = Behavior(), dialect: str | None = None):
        if dialect not in (None, "vllm", "llama.cpp", "transformers"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.props: dict | None = None
        self.tokenize_answer: dict | None = None
        self.default = default
        self.behaviors: dict[str, Behavior] = {}
        self.calls: Counter[str] = Counter()
        self.hung_up: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.app = self._build()

    def set(self, model: str | None = None, **changes) -> None:
        with self._lock:
            if model is None:
                self.default = replace(self.default, **changes)
            else:
                self.behaviors[model] = replace(self.behaviors.get(model, self.default), **changes)

    def behavior(self, model: str) -> Behavior:
        with self._lock:
            return self.behaviors.get(model, self.default)

    def reset(self) -> None:
        with self._lock:
            self.behaviors.clear()
            self.default = Behavior()
            self.calls.clear()
            self.hung_up.clear()
            self.props = self.tokenize_answer = None

    def _build(self):
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        stub = self

        @app.get("/v1/models")
        async def models():
            with stub._lock:
                listed = [(m, b) for m, b in stub.behaviors.items()
                          if b.listed and (stub.dialect != "transformers" or stub.calls[m])]
            return {"object": "list", "data": [stub._card(m, b) for m, b in listed]}

        @app.get("/props")
        async def props():
            if stub.dialect == "llama.cpp" and stub.props is not None:
                return stub.props
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        async def answer(request: Request, operation: str):
            body = await request.json()
            model = body.get("model", "")
            with stub._lock:
                stub.calls[model] += 1
            b = stub.behavior(model)
            if not await stub._wait(request, b.hang if b.mode == "hang" else b.delay):
                with stub._lock:
                    stub.hung_up[model] += 1
                return Response(status_code=499)
            if b.mode == "fail":
                return JSONResponse({"error": {"message": "stub failure", "type": "server_error", "param": None,
                                               "code": None}}, status_code=b.status)
            if b.mode == "invalid_json":
                return Response("{this is not json", media_type="application/json")
            if b.mode == "unauthorized":
                return stub._unauthorized(request)
            reply = b.reply
            if b.replies:
                users = [str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user"]
                asked = str(body.get("prompt", "")) if operation == "text_completion" else (users or [""])[-1]
                reply = b.replies.get(asked, b.reply)
            chunks = [reply[i:i + 4] for i in range(0, len(reply), 4)]
            limit = int(body.get("max_tokens") or len(chunks) or 1)
            finish = "length" if len(chunks) > limit else "stop"
            chunks = chunks[:limit]
            prompt = body.get("prompt") if operation == "text_completion" else \
                "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            usage = {"prompt_tokens": len(str(prompt or "")) // 4 + 1, "completion_tokens": len(chunks),
                     "total_tokens": len(str(prompt or "")) // 4 + 1 + len(chunks)}
            rid = f"stub-{uuid.uuid4().hex[:12]}"
            if body.get("stream"):
                failure = {"message": f"token {_quoted_token(request)} expired mid-stream"} \
                    if b.mode == "stream_error" else None
                return StreamingResponse(stub._stream(operation, rid, model, chunks, finish, usage, b.interval,
                                                      failure), media_type="text/event-stream")
            text = "".join(chunks)
            choice = {"index": 0, "finish_reason": finish}
            if operation == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            answer = {"id": rid, "object": "chat.completion" if operation == "chat" else "text_completion",
                      "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}
            if stub.dialect == "llama.cpp":
                prompt_n, predicted_n = usage["prompt_tokens"], usage["completion_tokens"]
                answer["timings"] = {"prompt_n": prompt_n, "prompt_ms": prompt_n * stub.PROMPT_MS,
                                     "predicted_n": predicted_n, "predicted_ms": predicted_n * stub.PREDICTED_MS}
            return answer

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await answer(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await answer(request, "text_completion")

        @app.post("/tokenize")
        async def tokenize(request: Request):  # 4-character chunks, as the replies are cut
            body = await request.json()
            if stub.behavior(body.get("model", "")).mode == "unauthorized":
                return stub._unauthorized(request)
            if stub.tokenize_answer is not None:
                return stub.tokenize_answer
            if stub.dialect == "vllm":
                if not isinstance(body.get("prompt"), str):
                    return JSONResponse({"error": {"message": "prompt: Field required"}}, status_code=400)
                tokens = _chunk_ids(body["prompt"])
                return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens}
            if stub.dialect == "llama.cpp":
                return {"tokens": _chunk_ids(str(body["content"])) if "content" in body else []}
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        return app

    def _card(self, model: str, behavior: Behavior) -> dict:
        """A model's /v1/models entry, as the dialect's server writes it."""
        entry = {"id": model, "object": "model", "owned_by": "stub", **(behavior.card or {})}
        now = int(time.time())
        if self.dialect == "vllm":
            entry.update(created=now, root=model, max_model_len=2048, permission=[
                {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now}])
        elif self.dialect == "llama.cpp":
            entry.update(created=now, owned_by="llamacpp")
        elif self.dialect == "transformers":
            entry.update(created=0, status={"value": "loaded"})
        return entry

    @staticmethod
    async def _wait(request: Request, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the caller has hung up."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if await request.is_disconnected():
                return False
            await asyncio.sleep(min(left, 0.05))
        return True

    @staticmethod
    def _unauthorized(request: Request) -> JSONResponse:
        token = _quoted_token(request)
        return JSONResponse({"error": {"message": f"Incorrect API key provided: {token} (sent as "
                                                  f"{request.headers.get('authorization')!r}; it starts {token[:12]})",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                            status_code=401)

    @staticmethod
    async def _stream(operation, rid, model, chunks, finish, usage, interval=0.0, failure=None):
        obj = "chat.completion.chunk" if operation == "chat" else "text_completion"

        def event(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                                          "choices": choices, **extra}) + "\n\n"

        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if operation == "chat":
                choice = {"index": 0, "delta": {"content": chunk}, "finish_reason": finish if last else None}
            else:
                choice = {"index": 0, "text": chunk, "finish_reason": finish if last else None}
            yield event([choice])
            if failure is not None:
                yield "data: " + json.dumps({"error": failure}) + "\n\n"
                return
            await asyncio.sleep(interval if not last else 0)
        yield event([], usage=usage)
        yield "data: [DONE]\n\n"


def _chunk_ids(text: str) -> list[int]:
    return list(range((len(text) + 3) // 4))


def _quoted_token(request: Request) -> str:
    """The bearer token a request carried (what a careless upstream quotes back)."""
    return request.headers.get("authorization", "").removeprefix("Bearer ")
