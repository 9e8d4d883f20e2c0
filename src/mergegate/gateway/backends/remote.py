"""An OpenAI-compatible upstream reached over HTTP, with a timeout per call.

Calls go through one long-lived httpcore connection pool per upstream (keep-alive, as many idle connections kept
as may be open): httpx's client layers (URL merging, cookies, auth, redirects, event hooks) cost about as much
CPU again as the HTTP exchange itself, for nothing a fixed upstream needs. Bodies are encoded once to bytes, the
request line and headers are fixed at start, and an SSL context is made only for an https upstream. An
`httpx.AsyncClient` over the same URL is made on first use for the rare calls that want one (`_http`).

At most `max_connections` calls are in flight; more wait for a `Slot` (untimed by callers: queueing is load,
not failure) and beyond `queue_limit` waiting callers the upstream reports itself overloaded.

The upstream's HTTP errors are classified: 400, 413 and 422 say the request is wrong (`BackendRejected`, not
held against the upstream's health), 429 says it is busy (`BackendOverloaded`, load), anything else — 401,
404, 5xx — says the upstream or its configuration is (`BackendHTTPError`, counted by the breaker); 508 is a
gateway on the way refusing a loop back to one it already passed (`BackendLoop`: hops.py). Each request carries
the hop header naming the gateways it passed through.

What an upstream sends back is taken within the bounds every caller of an OpenAI-compatible server is held to
(`serving.bounds`, as the endpoint runner's client): a non-streamed call, from connecting to its answer's last
byte, within `timeout` (an upstream trickling bytes is a timeout, not a wait without end); an answer, and each line
of a stream, no larger than the request's max_tokens allows; usage counts that are whole numbers >= 0. A
non-streamed answer is read into the client's `Reply`."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator

import httpcore
import httpx

from ...serving.bounds import AnswerTooLarge, answer_limit, read_limited, upstream_text, usage_counts
from ...serving.client import ERROR_BYTES, Reply
from ..errors import (
    BackendBadResponse,
    BackendError,
    BackendHTTPError,
    BackendLoop,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from ..hops import HOP_HEADER, hop_header
from ..protocol import Completion, GenRequest
from .base import Backend, Slot


class RemoteBackend(Backend):
    kind = "remote"
    provider = "openai"  # the wire protocol; OpenTelemetry's gen_ai.provider.name for OpenAI-compatible APIs

    def __init__(self, name: str, url: str, *, upstream_model: str | None = None, timeout: float = 60.0,
                 api_key: str | None = None, max_connections: int = 64, queue_limit: int = 64):
        self.name, self.url = name, url.rstrip("/")
        self.upstream_model = upstream_model or name
        self.timeout, self.api_key = timeout, api_key
        self.max_connections, self.queue_limit = max_connections, queue_limit
        self._client: httpx.AsyncClient | None = None
        self._pool: httpcore.AsyncConnectionPool | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._timeouts: dict[str, float] = {}
        self._gate: asyncio.Semaphore | None = None
        self._waiting = 0

    async def start(self) -> None:
        self._gate = asyncio.Semaphore(self.max_connections)
        url = httpx.URL(self.url)
        https = url.scheme == "https"
        host = url.host if url.port is None else f"{url.host}:{url.port}"
        self._headers = [(b"host", host.encode("ascii")), (b"content-type", b"application/json"),
                         (b"accept", b"application/json, text/event-stream")]
        if self.api_key:
            self._headers.append((b"authorization", f"Bearer {self.api_key}".encode()))
        self._timeouts = {"connect": min(self.timeout, 5.0), "read": self.timeout, "write": self.timeout,
                          "pool": self.timeout}
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context() if https else None, max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections, keepalive_expiry=30.0)

    async def acquire(self) -> Slot:
        """A connection's worth of capacity: waits while `max_connections` calls are in flight."""
        gate = self._gate
        if gate is None:
            raise BackendUnavailable(f"upstream '{self.name}' is not started")
        if gate.locked() and self._waiting >= self.queue_limit:
            raise BackendOverloaded(f"upstream '{self.name}' has {self.max_connections} calls in flight and "
                                    f"{self._waiting} waiting")
        self._waiting += 1
        try:
            await gate.acquire()
        finally:
            self._waiting -= 1
        return Slot(gate.release)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "upstream_model": self.upstream_model}

    async def count_prompt_tokens(self, request: GenRequest) -> int:
        """An estimate (4 characters a token): the upstream enforces its own context limit."""
        text = request.prompt if request.operation == "text_completion" else \
            "\n".join(m["content"] for m in request.messages)
        return math.ceil(len(text) / 4)

    # -- calls -------------------------------------------------------------------------------------------
    def _endpoint_and_body(self, request: GenRequest, stream: bool) -> tuple[str, dict]:
        p = request.params
        body: dict = {"model": self.upstream_model, "max_tokens": p.max_tokens,
                      "temperature": p.temperature if p.temperature is not None else 0}
        for key in ("top_p", "seed"):
            if getattr(p, key) is not None:
                body[key] = getattr(p, key)
        if p.stop:
            body["stop"] = list(p.stop)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if request.operation == "chat":
            return "chat/completions", {**body, "messages": list(request.messages)}
        return "completions", {**body, "prompt": request.prompt}

    async def generate(self, request: GenRequest, *, slot: Slot | None = None) -> Completion:
        if slot is not None:  # the caller's: released by the caller when this returns
            return await self._generate(request)
        slot = await self.acquire()
        try:
            return await self._generate(request)
        finally:
            slot.release()

    def _request(self, request: GenRequest, stream: bool) -> httpcore.Request:
        endpoint, body = self._endpoint_and_body(request, stream)
        if self._pool is None:
            raise BackendUnavailable(f"upstream '{self.name}' is not started")
        content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = [*self._headers, (b"content-length", str(len(content)).encode())]
        if request.hops:
            headers.append((HOP_HEADER.encode(), hop_header(request.hops).encode()))
        return httpcore.Request(b"POST", f"{self.url}/{endpoint}", headers=headers,
                                content=content, extensions={"timeout": self._timeouts})

    async def _generate(self, request: GenRequest) -> Completion:
        call = self._request(request, stream=False)
        max_tokens = request.params.max_tokens
        try:
            async with asyncio.timeout(self.timeout):
                with _translated_errors(self.name):
                    reply = await self._exchange(call, answer_limit(max_tokens), f"{max_tokens} tokens")
        except TimeoutError:
            raise BackendTimeout(f"upstream '{self.name}' sent no complete answer within {self.timeout:g} s") \
                from None
        except AnswerTooLarge as exc:
            raise BackendBadResponse(f"upstream '{self.name}': {exc}") from None
        _raise_for_status(self.name, reply.status_code, reply.content, self.api_key)
        try:
            data = reply.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if request.operation == "chat" else choice["text"]
            usage = data.get("usage")
            finish_reason = choice.get("finish_reason") or "stop"
            response_id, response_model = str(data.get("id") or ""), data.get("model")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendBadResponse(f"upstream '{self.name}' sent an answer that is not an OpenAI "
                                     f"{request.operation} response ({type(exc).__name__}: {exc})") from None
        prompt_tokens, completion_tokens = _usage(self.name, usage) or (0, 0)
        return Completion(text=text or "", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          finish_reason=finish_reason, response_id=response_id, response_model=response_model)

    async def _exchange(self, call: httpcore.Request, limit: int, allowed_for: str) -> Reply:
        """One call's answer, read whole: refused past `limit` bytes (AnswerTooLarge), an error's cut to its first
        ERROR_BYTES (only its start is shown)."""
        assert self._pool is not None  # _request checked
        response = await self._pool.handle_async_request(call)
        try:
            if response.status >= 400:
                content = await read_limited(response.aiter_stream(), ERROR_BYTES, cut=True)
            else:
                content = await read_limited(response.aiter_stream(), limit, allowed_for=allowed_for)
        finally:
            await response.aclose()
        return Reply(response.status, response.headers, content)

    async def stream(self, request: GenRequest, *, slot: Slot | None = None) -> AsyncIterator[str | Completion]:
        own = None if slot is not None else await self.acquire()  # a caller's slot is the caller's to release
        try:
            call = self._request(request, stream=True)
            assert self._pool is not None  # _request checked
            parts: list[str] = []
            used: dict[str, Any] = {}
            finish, response_id, response_model = "stop", "", None
            with _translated_errors(self.name):
                response = await self._pool.handle_async_request(call)
                try:
                    if response.status >= 400:
                        error = await read_limited(response.aiter_stream(), ERROR_BYTES, cut=True)
                        _raise_for_status(self.name, response.status, error, self.api_key)
                    async for line in _lines(self.name, response.aiter_stream(),
                                             answer_limit(request.params.max_tokens)):
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        chunk = _parse_chunk(self.name, payload, self.api_key)
                        response_id = chunk.get("id") or response_id
                        response_model = chunk.get("model") or response_model
                        if chunk.get("usage"):
                            used = chunk["usage"]
                            _usage(self.name, used)
                        for choice in chunk.get("choices") or []:
                            delta = (choice.get("delta") or {}).get("content") if request.operation == "chat" \
                                else choice.get("text")
                            if delta:
                                parts.append(delta)
                                yield delta
                            finish = choice.get("finish_reason") or finish
                finally:
                    await response.aclose()
            counts = _usage(self.name, used) or (0, 0)
            completion_tokens = counts[1] if used.get("completion_tokens") is not None else len(parts)
            yield Completion(text="".join(parts), prompt_tokens=counts[0], completion_tokens=completion_tokens,
                             finish_reason=finish, response_id=response_id, response_model=response_model)
        finally:
            if own is not None:
                own.release()

    def _http(self) -> httpx.AsyncClient:
        """An httpx client over this upstream (made on first use; calls themselves use the pool)."""
        if self._pool is None:
            raise BackendUnavailable(f"upstream '{self.name}' is not started")
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(base_url=self.url + "/", headers=headers, trust_env=False,
                                             timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)))
        return self._client


REJECTED = (400, 413, 422)  # the request's fault: the upstream refused what it was sent


async def _lines(name: str, chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[str]:
    """A byte stream's lines (\n or \r\n ended), decoded as UTF-8; a last unterminated line too. A line past
    `limit` bytes (what the whole answer may take) is refused (BackendBadResponse) as soon as it is."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        if len(pending) > limit or any(len(line) > limit for line in complete):
            raise BackendBadResponse(f"upstream '{name}': a stream line passed {limit:,} bytes, the most accepted "
                                     "for the tokens asked for; refused")
        for line in complete:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


class _translated_errors:
    """httpcore's (and httpx's) exceptions → BackendError subclasses (a context manager usable around
    `async with` too)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, BackendError):
            return False
        if isinstance(exc, (httpx.TimeoutException, httpcore.TimeoutException)):
            raise BackendTimeout(f"upstream '{self.name}' timed out ({type(exc).__name__})") from None
        if isinstance(exc, (httpx.TransportError, httpcore.NetworkError, httpcore.ProtocolError,
                            httpcore.UnsupportedProtocol)):
            raise BackendUnavailable(f"upstream '{self.name}' unreachable ({type(exc).__name__}: {exc})") from None
        return False


def _usage(name: str, usage: Any) -> tuple[int, int] | None:
    """An answer's (prompt_tokens, completion_tokens), None without usage; BackendBadResponse when a count is not a
    whole number >= 0 (they reach metrics, cost reports and the registry)."""
    try:
        return usage_counts(usage)
    except ValueError as exc:
        raise BackendBadResponse(f"upstream '{name}' sent {exc}") from None


def _raise_for_status(name: str, status: int, content: bytes, api_key: str | None) -> None:
    """An upstream's HTTP error as a BackendError whose message carries the upstream's own (its error.message, else
    its body), redacted of the key this upstream is sent and bounded: the message reaches callers and traces."""
    if status < 400:
        return
    detail: object = content
    try:
        detail = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    detail = upstream_text(detail if isinstance(detail, (str, bytes)) else str(detail), [api_key])
    kind = BackendRejected if status in REJECTED else BackendOverloaded if status == 429 else \
        BackendLoop if status == 508 else BackendHTTPError
    raise kind(f"upstream '{name}' answered HTTP {status}: {detail}", status=status)


def _parse_chunk(name: str, payload: str, api_key: str | None) -> dict:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        raise BackendBadResponse(f"upstream '{name}' sent a stream chunk that is not JSON: "
                                 f"{upstream_text(payload, [api_key], limit=100)!r}") from None
    if not isinstance(chunk, dict):
        raise BackendBadResponse(f"upstream '{name}' sent a stream chunk that is not an object")
    if "error" in chunk:
        raise BackendHTTPError(f"upstream '{name}' reported an error mid-stream: "
                               f"{upstream_text(json.dumps(chunk['error']), [api_key])}")
    return chunk
