"""One client for OpenAI-compatible servers: the endpoint runner, the LLM judge, the readiness check and the
`/models` reader all speak through it.

A `Request` names what is sent and how many bytes its answer may take; a `Reply` is that answer, read whole within
its bound (`bounds.read_limited`). Each try, from connecting to the answer's last byte, has `timeout_s` (a server
trickling bytes is a timeout, not a wait without end); an error's answer is cut to its first ERROR_BYTES. Proxy
settings in the environment are never read (`trust_env=False`): a request goes where its URL says, with its
credentials, and nowhere else. Answers are asked for uncompressed, so a bound is on the bytes that reach memory.

When to try again (`call`): connection errors, timeouts, 429 and 5xx; the wait doubles from `backoff_s` (at most
30 s), and a server's `Retry-After` (seconds or an HTTP date, at most 60 s) replaces it. An answer past its bound
is not tried again: a server that sends too much would send it again.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Coroutine, TypeVar

from .bounds import read_limited, redacted

RETRIED_STATUSES = (429, 500, 502, 503, 504)
ERROR_BYTES = 16 * 1024  # the start of an error's body kept (only its first few hundred characters are shown)

T = TypeVar("T")


def retry_after(value: str | None) -> float | None:
    """A `Retry-After` header in seconds, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def retry_wait(attempt: int, backoff_s: float, retry_after_header: str | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (0 for the first)."""
    asked = retry_after(retry_after_header)
    return min(asked, 60.0) if asked is not None else min(backoff_s * 2 ** attempt, 30.0)


@dataclass(frozen=True)
class Settings:
    """Where a server is and how it is called. `base_url` ends at the API's root (e.g. `http://host:8000/v1`)."""

    base_url: str
    timeout_s: float
    retries: int = 0
    backoff_s: float = 0.5
    api_key: str | None = None
    concurrency: int = 1

    def shown(self, text: str) -> str:
        """Text from the server as shown to a person: the API key blanked, should the server quote it."""
        return redacted(text, [self.api_key])


@dataclass(frozen=True)
class Request:
    """One call: `path` relative to the base URL (or a whole URL), a JSON body or none, and the most bytes its
    answer may take (`limit`, with what they are `allowed_for`, as an error says)."""

    method: str
    path: str
    limit: int
    allowed_for: str = "it"
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    """A server's answer, read whole within its bound."""

    status_code: int
    headers: Any
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except RecursionError:  # nested deeper than the parser goes: not an answer either
            raise ValueError("nested too deeply") from None


class Unanswered(Exception):
    """No usable answer after every try: `last` says what the last try got."""

    def __init__(self, tries: int, last: str):
        self.tries, self.last = tries, last
        super().__init__(f"no answer after {tries} tr{'y' if tries == 1 else 'ies'}: {last}")


class Client:
    """An open connection pool to one server (`async with Client(settings) as client`)."""

    def __init__(self, settings: Settings):
        import httpx

        self.settings = settings
        key = settings.api_key
        headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/", trust_env=False, headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=settings.concurrency,
                                max_keepalive_connections=settings.concurrency))

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def exchange(self, request: Request) -> Reply:
        """One try, all within `timeout_s` (TimeoutError); the answer refused past its limit (AnswerTooLarge), an
        error's cut to its first ERROR_BYTES instead. Transport errors are httpx's."""
        async with asyncio.timeout(self.settings.timeout_s):
            async with self._http.stream(request.method, request.path, json=request.body) as response:
                if response.status_code >= 400:
                    content = await read_limited(response.aiter_bytes(), ERROR_BYTES, cut=True)
                else:
                    content = await read_limited(response.aiter_bytes(), request.limit,
                                                 allowed_for=request.allowed_for)
                return Reply(response.status_code, response.headers, content)

    async def call(self, request: Request) -> Reply:
        """The answer to `request` (any status but the retried ones), tried `retries` more times as the module
        says; Unanswered when no try got one, AnswerTooLarge at once for an answer past its bound."""
        import httpx

        settings, last = self.settings, ""
        for attempt in range(settings.retries + 1):
            asked = None
            try:
                reply = await self.exchange(request)
            except TimeoutError:
                last = f"no complete answer within {settings.timeout_s:g} s"
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if reply.status_code not in RETRIED_STATUSES:
                    return reply
                last = f"HTTP {reply.status_code}: {settings.shown(reply.text)[:200]}"
                asked = reply.headers.get("retry-after")
            if attempt < settings.retries:
                await asyncio.sleep(retry_wait(attempt, settings.backoff_s, asked))
        raise Unanswered(settings.retries + 1, last)


def run_apart(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on an event loop of its own, in a helper thread, for a caller that blocks: the
    caller may itself be inside an event loop (the endpoint runner scores rows, and so asks the judge, in its own)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergegate-client") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def call_blocking(settings: Settings, request: Request) -> Reply:
    """`Client.call` for a caller that blocks (the judge, the readiness check)."""

    async def go() -> Reply:
        async with Client(settings) as client:
            return await client.call(request)

    return run_apart(go())


MODELS_BYTES = 4 * 1024 * 1024  # a GET /models answer: thousands of models' entries
MODELS = Request("GET", "models", MODELS_BYTES, "a model list")


def model_entries(reply: Reply) -> list[dict[str, Any]]:
    """The entries of a `GET /models` answer (those that are objects); ValueError when it is not an OpenAI model
    list."""
    try:
        return [entry for entry in reply.json()["data"] if isinstance(entry, dict)]
    except (KeyError, TypeError):
        raise ValueError("not an OpenAI model list") from None
