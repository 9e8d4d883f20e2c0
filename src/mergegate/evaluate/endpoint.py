"""Evaluate a model behind an OpenAI-compatible server (vLLM, TGI, the mergegate gateway): `ModelRef.url`.

Each suite row is one POST: a prompt row to `{url}/completions` (its `prompt`; the answer `choices[0].text`), a
chat row to `{url}/chat/completions` (its `messages`; the answer `choices[0].message.content`), with the
generation settings sent explicitly (temperature 0, n 1, max_tokens the row's own budget as the in-process runner computes it), at most
`EndpointSettings.concurrency` in flight. Connection errors, timeouts, 5xx and 429 are retried with exponential
backoff (a 429's or 503's `Retry-After` honoured); any other HTTP error stops the run (EvaluationError).
A row's latency is its request's wall time (retries included); its token counts are the server's `usage`.

What a server sends back is taken within bounds (`serving.client`, `serving.bounds`): each try of a request, from connecting
to its answer's last byte, within `timeout_s` (a server trickling bytes is a timeout, not a wait without end);
an answer no larger than what was asked for allows (a row's budget in tokens; GET /models and /tokenize a
fixed size), read as a stream and refused past it; token counts that are whole numbers >= 0. Text a server sends
back in an error is shown with the model's API key blanked.
A model's own settings (`ModelRef.endpoint`, from a models file) replace the command's for that model; settings
change speed only, so none of them is in the cache key.

The model's identity (its hash in the registry, part of the cache key) is what `GET {url}/models` reports for
the served model — its id and the stable fields beside it (`root`, `parent`, `owned_by`, `max_model_len`, and
any field named like a fingerprint, hash, digest, revision or version) — with the served name; never the URL
alone. `created` is left out: vLLM stamps it with the time of each /models call.

A row's budget is min(max_new_tokens, 2 * tokens of `expected` + 8), tokens counted by the server's
`POST /tokenize` (vLLM's, the gateway's for its local models); a server without one gives every row
max_new_tokens, and the run config says which (`budget`). Perplexity needs the likelihood of `expected`, which
completions do not give: such rows are refused for a url model (`check_rows`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import EvaluationError
from ..model_ref import EndpointSettings, ModelRef  # EndpointSettings: importable from here too
from ..registry import RowResult
from ..serving.bounds import AnswerTooLarge, answer_limit, redacted, usage_counts
from ..serving.client import MODELS, Client, Reply, Request, Settings, Unanswered, model_entries
from .evaluators import Observation, needs_likelihood, score_row
from .suite import SuiteRow

ENDPOINT_FORMAT = "1"  # bump with any change to the request sent or to how an answer is read
_IDENTITY_FIELDS = ("id", "root", "parent", "owned_by", "max_model_len")
_FINGERPRINT = re.compile(r"fingerprint|hash|digest|revision|version|sha", re.IGNORECASE)


def check_rows(ref: ModelRef, rows: Sequence[SuiteRow]) -> None:
    """Refuse rows a completions API cannot score (EvaluationError)."""
    likelihood = [row.id for row in rows if needs_likelihood(row)]
    if likelihood:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): evaluator 'perplexity' needs the likelihood of the "
                              f"expected answer, which a completions endpoint does not give; row(s) "
                              f"{', '.join(likelihood[:5])}{' …' if len(likelihood) > 5 else ''} cannot be "
                              "evaluated through a server (evaluate a local folder, or drop perplexity)")


def _httpx():
    try:
        import httpx
    except ImportError:
        raise EvaluationError("evaluating a model through its server needs httpx: pip install 'mergegate[serve]'") \
            from None
    return httpx


def _client(ref: ModelRef, settings: EndpointSettings) -> Client:
    _httpx()
    assert ref.url is not None
    return Client(Settings(ref.url, settings.timeout_s, settings.retries, settings.backoff_s, settings.api_key(),
                           settings.concurrency))


def served_name(ref: ModelRef) -> str:
    return ref.served_model or ref.name


def identity_hash(identity: dict) -> str:
    return "endpoint:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


async def _request(client: Client, ref: ModelRef, request: Request, *, what: str) -> Reply:
    """One call with retries (`Client.call`); the answer (any status but the retried ones), or EvaluationError."""
    try:
        return await client.call(request)
    except AnswerTooLarge as exc:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): {what}: {exc}") from None
    except Unanswered as exc:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): {what} failed after {exc.tries} "
                              f"tr{'y' if exc.tries == 1 else 'ies'}: {exc.last}") from None


def _error_text(ref: ModelRef, settings: EndpointSettings, response: Reply, what: str) -> EvaluationError:
    detail = response.text
    try:
        detail = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return EvaluationError(f"model '{ref.name}' ({ref.url}): {what} answered HTTP {response.status_code}: "
                           f"{redacted(detail, [settings.api_key()])[:300]}")


async def _identity(client: Client, ref: ModelRef, settings: EndpointSettings) -> dict:
    response = await _request(client, ref, MODELS, what="GET /models")
    if response.status_code >= 400:
        raise _error_text(ref, settings, response, "GET /models")
    try:
        entries = model_entries(response)
        entry = next((e for e in entries if e.get("id") == served_name(ref)), None)
        listed = [str(e.get("id")) for e in entries]
    except ValueError:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): GET /models did not answer an OpenAI model "
                              "list") from None
    if entry is None:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): the server does not serve '{served_name(ref)}' "
                              f"(it lists {', '.join(listed[:10]) or 'no models'})")
    reported = {k: v for k, v in entry.items() if k in _IDENTITY_FIELDS or (_FINGERPRINT.search(k) and k != "created")}
    return {"served_model": served_name(ref), "reported": reported}


async def _budget(client: Client, ref: ModelRef, row: SuiteRow, max_new_tokens: int, root: str,
                  settings: EndpointSettings) -> int | None:
    """The row's budget from the server's tokenizer; None when the server has no /tokenize (or it does not
    answer in time, or answers more than `expected`'s tokens can take). Only `expected` is counted, so a chat
    row's budget is found as a prompt row's."""
    httpx = _httpx()
    body = {"model": served_name(ref), "prompt": row.expected, "add_special_tokens": False}
    # at most a token per byte of `expected`, each a number of a few digits (or a token's text)
    request = Request("POST", root + "/tokenize", answer_limit(len(row.expected.encode()) + 8), "a count of tokens",
                      body)
    try:
        response = await client.exchange(request)
    except (httpx.HTTPError, TimeoutError, AnswerTooLarge):
        return None
    if response.status_code >= 400:
        return None
    try:
        data = response.json()
        count = int(data["count"]) if "count" in data else len(data["tokens"])
    except (ValueError, KeyError, TypeError):
        return None
    return min(max_new_tokens, 2 * count + 8)


def _root(url: str) -> str:
    """The server's root (where vLLM's /tokenize is): the url without a trailing /v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class Prepared:
    identity: dict
    budgets: dict[str, int]
    budget_mode: str  # "tokenize" | "max_new_tokens"


def prepare(ref: ModelRef, rows: Sequence[SuiteRow], max_new_tokens: int, settings: EndpointSettings) -> Prepared:
    """The server's identity for the served model and every row's token budget (nothing is generated)."""
    settings = ref.endpoint_settings(settings)

    async def go() -> Prepared:
        async with _client(ref, settings) as client:
            identity = await _identity(client, ref, settings)
            assert ref.url is not None
            root = _root(ref.url)
            gate = asyncio.Semaphore(settings.concurrency)

            async def one(row):
                async with gate:
                    return await _budget(client, ref, row, max_new_tokens, root, settings)

            found = await asyncio.gather(*(one(row) for row in rows)) if rows else []
            if rows and all(b is not None for b in found):
                return Prepared(identity, {row.id: b for row, b in zip(rows, found) if b is not None}, "tokenize")
            return Prepared(identity, {row.id: max_new_tokens for row in rows}, "max_new_tokens")

    return asyncio.run(go())


def run_rows(ref: ModelRef, model_hash: str, rows: Sequence[SuiteRow], budgets: dict[str, int],
             settings: EndpointSettings, on_result: Callable[[RowResult], None]) -> None:
    """Send every row (at most `settings.concurrency` at once); `on_result` gets each scored row as it completes,
    in this (the calling) thread. The first row that fails for good stops the run (EvaluationError); rows
    already handed to `on_result` stay. `settings` are the command's (the model's own override them)."""
    settings = ref.endpoint_settings(settings)

    async def go() -> None:
        no_usage = False
        async with _client(ref, settings) as client:
            gate = asyncio.Semaphore(settings.concurrency)

            async def one(row: SuiteRow):
                async with gate:
                    started = time.perf_counter()
                    path, body = _row_request(ref, row, budgets[row.id])
                    request = Request("POST", path, answer_limit(budgets[row.id]), f"{budgets[row.id]} tokens", body)
                    response = await _request(client, ref, request, what=f"row {row.id}")
                    latency_ms = (time.perf_counter() - started) * 1000
                if response.status_code >= 400:
                    raise _error_text(ref, settings, response, f"row {row.id}")
                text, usage = _read_answer(ref, row, response)
                return row, text, usage, latency_ms

            tasks = [asyncio.ensure_future(one(row)) for row in rows]
            try:
                for finished in asyncio.as_completed(tasks):
                    row, text, usage, latency_ms = await finished
                    no_usage = no_usage or usage is None
                    prompt_tokens, completion_tokens = usage or (0, 0)
                    scores = score_row(row, Observation(output=text))
                    details: dict[str, Any] = {k: {"score": v.score, "passed": v.passed, "reason": v.reason}
                                               for k, v in scores.items()}
                    on_result(RowResult(row.id, row.cohort, ref.name, model_hash, text, prompt_tokens,
                                        completion_tokens, latency_ms, min(v.score for v in scores.values()),
                                        all(v.passed for v in scores.values()), details))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if no_usage:
            warnings.warn(f"model '{ref.name}' ({ref.url}): the server sent no usage; token counts recorded as 0",
                          stacklevel=2)

    asyncio.run(go())


def _read_answer(ref: ModelRef, row: SuiteRow, response: Reply) -> tuple[str, tuple[int, int] | None]:
    """A row's answer: its text and its token counts (None when the server sent no usage); EvaluationError when it
    is not an OpenAI completion or its counts are not whole numbers >= 0."""
    where = f"model '{ref.name}' ({ref.url}): row {row.id}"
    try:
        data = response.json()
        choice = data["choices"][0]
        text = (choice["text"] if row.messages is None else choice["message"]["content"]) or ""
        usage = data.get("usage")
    except (ValueError, KeyError, IndexError, TypeError):
        raise EvaluationError(f"{where}: the answer is not an OpenAI "
                              f"{'completion' if row.messages is None else 'chat completion'}") from None
    try:
        return str(text), usage_counts(usage)
    except ValueError as exc:
        raise EvaluationError(f"{where}: {exc}") from None


def _row_request(ref: ModelRef, row: SuiteRow, budget: int) -> tuple[str, dict[str, Any]]:
    """Where a row is POSTed and its body: a prompt to `completions`, a chat to `chat/completions`, both with
    the same explicit generation settings."""
    settings = {"max_tokens": budget, "temperature": 0, "n": 1, "stream": False}
    if row.messages is None:
        return "completions", {"model": served_name(ref), "prompt": row.prompt, **settings}
    return "chat/completions", {"model": served_name(ref), "messages": row.chat(), **settings}


def run_config(ref: ModelRef, evaluators: dict, *, max_new_tokens: int, budget_mode: str, runner_format: str) -> dict:
    """The cache key's config for a url model: what is sent and how the answer is read (the model's own identity
    is in its hash)."""
    return {
        "runner": runner_format,
        "endpoint": ENDPOINT_FORMAT,
        "generation": {"temperature": 0, "n": 1, "max_new_tokens": max_new_tokens, "budget": budget_mode},
        "evaluators": evaluators,
    }
