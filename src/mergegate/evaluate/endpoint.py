"""Evaluate a model behind an OpenAI-compatible server (vLLM, TGI, the mergegate gateway): `ModelRef.url`.

Each suite row is one POST: a prompt row to `{url}/completions` (its `prompt`; the answer `choices[0].text`), a
chat row to `{url}/chat/completions` (its `messages`; the answer `choices[0].message.content`), with the
generation settings sent explicitly (temperature 0, n 1, max_tokens the row's own budget as the in-process runner computes it), at most
`EndpointSettings.concurrency` in flight. Connection errors, timeouts, 5xx and 429 are retried with exponential
backoff (a 429's or 503's `Retry-After` honoured); any other HTTP error stops the run (EvaluationError).
A row's latency is its request's wall time (retries, the network and the server's queue included: at concurrency
8 a busy server's queue can be most of it); where the server reports its own timing of the row (llama.cpp's
`timings`: `prompt_ms` + `predicted_ms`) that is kept beside it as `server_ms` (vLLM and `transformers serve`
report none). Its token counts are the server's `usage`.

What a server sends back is taken within bounds (`serving.client`, `serving.bounds`): each try of a request, from connecting
to its answer's last byte, within `timeout_s` (a server trickling bytes is a timeout, not a wait without end);
an answer no larger than what was asked for allows (a row's budget in tokens; GET /models and /tokenize a
fixed size), read as a stream and refused past it; token counts that are whole numbers >= 0. Text a server sends
back in an error is shown with the model's API key blanked.
A model's own settings (`ModelRef.endpoint`, from a models file) replace the command's for that model; settings
change speed only, so none of them is in the cache key.

The model's identity (its hash in the registry, part of the cache key) is what `GET {url}/models` reports for
the served model — its entry with every field but those a server stamps anew (`_VOLATILE_FIELDS`: vLLM's
`created` and `permission`, `transformers serve`'s `status`), so llama.cpp's `meta` (parameters, size, vocabulary)
and the gateway's fingerprints are in it — and, from a server that answers `GET {root}/props` (llama.cpp's), the
weights' file, chat template and build (`_PROPS_FIELDS`); with the served name, never the URL alone. A model
the server does not list is asked for once (one request with a one-token budget, as `transformers serve` loads a
model on its first request) and the list read again; a model that answers but is still not listed is evaluated
under its name alone (a warning says so), one that does not answer is refused naming what was tried.

A row's budget is min(max_new_tokens, 2 * tokens of `expected` + 8), tokens counted by the server's
`POST /tokenize`, asked in both dialects at once (`prompt`: vLLM's and the gateway's; `content`: llama.cpp's,
which answers `{"tokens": []}` to a request without it). An answer that cannot be right (no tokens for a
non-empty text, a count that is not a whole number, an error, no /tokenize) gives every row max_new_tokens
instead, with a warning naming why; the run config says which was used (`budget`), so it is in the cache key.
Perplexity needs the likelihood of `expected`, which completions do not give: such rows are refused for a url
model (`check_rows`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import EvaluationError
from ..model_ref import EndpointSettings, ModelRef  # EndpointSettings: importable from here too
from ..registry import RowResult
from ..serving.bounds import AnswerTooLarge, answer_limit, redacted, usage_counts
from ..serving.client import MODELS, MODELS_BYTES, Client, Reply, Request, Settings, Unanswered, model_entries
from .evaluators import Observation, needs_likelihood, score_row
from .suite import SuiteRow, answer_budget

ENDPOINT_FORMAT = "2"  # bump with any change to the request sent or to how an answer is read
# Fields of a /models entry a server stamps anew: vLLM's `created` and `permission` (a random id and the time, at
# each call), `transformers serve`'s `status` (whether the model is in memory now).
_VOLATILE_FIELDS = frozenset({"created", "permission", "status"})
# What llama.cpp's GET /props says of the weights loaded (their file), how a chat is rendered, and its build.
_PROPS_FIELDS = ("model_path", "chat_template", "build_info")
NOT_LISTED = "not listed by the server"


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


def _error_detail(settings: EndpointSettings, response: Reply) -> str:
    """What an error answer says (its OpenAI `error.message`, else its text), the API key blanked, cut short."""
    detail = response.text
    try:
        detail = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return redacted(detail, [settings.api_key()])[:300]


def _error_text(ref: ModelRef, settings: EndpointSettings, response: Reply, what: str) -> EvaluationError:
    return EvaluationError(f"model '{ref.name}' ({ref.url}): {what} answered HTTP {response.status_code}: "
                           f"{_error_detail(settings, response)}")


async def _listed(client: Client, ref: ModelRef, settings: EndpointSettings) -> list[dict[str, Any]]:
    """The entries of the server's GET /models (EvaluationError when it answers none)."""
    response = await _request(client, ref, MODELS, what="GET /models")
    if response.status_code >= 400:
        raise _error_text(ref, settings, response, "GET /models")
    try:
        return model_entries(response)
    except ValueError:
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): GET /models did not answer an OpenAI model "
                              "list") from None


async def _ask_once(client: Client, ref: ModelRef, settings: EndpointSettings, row: SuiteRow) -> str | None:
    """One request naming the model with a one-token budget (`row`'s, as the run will send it), for a server that
    loads a model on its first request: None when it was answered, else what came back instead."""
    path, body = _row_request(ref, row, 1)
    try:
        response = await client.call(Request("POST", path, answer_limit(1), "1 token", body))
    except AnswerTooLarge as exc:
        return f"answered {exc}"
    except Unanswered as exc:
        return f"got no answer after {exc.tries} tr{'y' if exc.tries == 1 else 'ies'}: {exc.last}"
    if response.status_code >= 400:
        return f"answered HTTP {response.status_code}: {_error_detail(settings, response)}"
    return None


async def _identity(client: Client, ref: ModelRef, settings: EndpointSettings, root: str,
                    rows: Sequence[SuiteRow], notes: list[str]) -> dict:
    """What the server reports of the served model (the module says what is kept), asking for it once when it is
    not listed; EvaluationError when it is neither listed nor answered. What the caller should hear goes to
    `notes`."""
    name = served_name(ref)
    entries = await _listed(client, ref, settings)
    entry, tried = _entry(entries, name), ""
    if entry is None and rows:  # a server that loads a model on its first request lists it only then
        failed = await _ask_once(client, ref, settings, rows[0])
        if failed is None:
            entries = await _listed(client, ref, settings)
            entry = _entry(entries, name)
        else:
            tried = f"; a one-token request naming it {failed}"
    if entry is None and (tried or not rows):
        listed = ", ".join(str(e.get("id")) for e in entries[:10]) or "no models"
        raise EvaluationError(f"model '{ref.name}' ({ref.url}): the server does not serve '{name}' (it lists "
                              f"{listed}{tried})")
    identity: dict[str, Any] = {"served_model": name}
    if entry is None:
        notes.append(f"model '{ref.name}' ({ref.url}): '{name}' answers but is {NOT_LISTED} under GET /models; "
                     "its results are cached under its name alone (evaluate with force when its weights change)")
        identity["reported"] = NOT_LISTED
    else:
        identity["reported"] = {k: v for k, v in entry.items() if k not in _VOLATILE_FIELDS}
    props = await _props(client, root)
    if props:
        identity["props"] = props
    return identity


def _entry(entries: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in entries if e.get("id") == name), None)


async def _props(client: Client, root: str) -> dict[str, Any]:
    """What a server's GET /props (llama.cpp's) says of the loaded weights (`_PROPS_FIELDS`); nothing from a server
    without one, or one that does not answer an object in time."""
    httpx = _httpx()
    try:
        response = await client.exchange(Request("GET", root + "/props", MODELS_BYTES, "server properties"))
        data = response.json() if response.status_code < 400 else None
    except (httpx.HTTPError, TimeoutError, AnswerTooLarge, ValueError):
        return {}
    return {k: data[k] for k in _PROPS_FIELDS if k in data} if isinstance(data, dict) else {}


async def _budget(client: Client, ref: ModelRef, row: SuiteRow, max_new_tokens: int, root: str) -> int | str:
    """The row's budget from the server's tokenizer, or why there is none: the server has no /tokenize, does not
    answer in time, answers more than `expected`'s tokens can take, or a count that cannot be right
    (`_token_count`). Only `expected` is counted, so a chat row's budget is found as a prompt row's."""
    httpx = _httpx()
    # `prompt` for vLLM (whose request model takes extra fields) and the gateway, `content` for llama.cpp
    body = {"model": served_name(ref), "prompt": row.expected, "content": row.expected, "add_special_tokens": False,
            "add_special": False}
    # at most a token per byte of `expected`, each a number of a few digits (or a token's text)
    request = Request("POST", root + "/tokenize", answer_limit(len(row.expected.encode()) + 8), "a count of tokens",
                      body)
    try:
        response = await client.exchange(request)
    except (httpx.HTTPError, TimeoutError) as exc:
        return f"no answer: {type(exc).__name__}"
    except AnswerTooLarge as exc:
        return str(exc)
    if response.status_code >= 400:
        return f"HTTP {response.status_code}"
    try:
        count = _token_count(response.json(), row.expected)
    except ValueError as exc:
        return str(exc)
    return answer_budget(count, max_new_tokens)


def _token_count(answer: Any, text: str) -> int:
    """The number of tokens a /tokenize answer gives for `text`: vLLM's `count` (with its `tokens`), llama.cpp's
    `tokens`. ValueError for one that cannot be right: not an object, a count that is not a whole number >= 0 or
    disagrees with its tokens, or none for a non-empty text (a server reading another field than was sent)."""
    if not isinstance(answer, dict):
        raise ValueError("the answer is not an object")
    tokens = answer.get("tokens")
    if "count" not in answer and not isinstance(tokens, list):
        raise ValueError(f"`tokens` is {str(tokens)[:40]!r}, not a list")
    count = answer["count"] if "count" in answer else len(tokens or ())
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"`count` is {str(count)[:40]!r}, not a whole number of tokens")
    if isinstance(tokens, list) and count != len(tokens):
        raise ValueError(f"`count` {count} disagrees with its {len(tokens)} tokens")
    if count == 0 and text:
        raise ValueError("no tokens for a non-empty text")
    return count


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
    notes: list[str] = []  # warned once the event loop is done, so that a warning names the caller

    async def go() -> Prepared:
        async with _client(ref, settings) as client:
            assert ref.url is not None
            root = _root(ref.url)
            identity = await _identity(client, ref, settings, root, rows, notes)
            gate = asyncio.Semaphore(settings.concurrency)

            async def one(row):
                async with gate:
                    return await _budget(client, ref, row, max_new_tokens, root)

            found = await asyncio.gather(*(one(row) for row in rows)) if rows else []
            budgets = {row.id: b for row, b in zip(rows, found) if isinstance(b, int)}
            if rows and len(budgets) == len(rows):
                return Prepared(identity, budgets, "tokenize")
            if rows:
                row, why = next((row, b) for row, b in zip(rows, found) if isinstance(b, str))
                notes.append(f"model '{ref.name}' ({ref.url}): the server's POST /tokenize gave no count of row "
                             f"{row.id}'s expected answer ({why}); every row gets max_new_tokens ({max_new_tokens}) "
                             "as its budget, not the in-process one (run config: budget max_new_tokens)")
            return Prepared(identity, {row.id: max_new_tokens for row in rows}, "max_new_tokens")

    prepared = asyncio.run(go())
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return prepared


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
                text, usage, server_ms = _read_answer(ref, row, response)
                return row, text, usage, latency_ms, server_ms

            tasks = [asyncio.ensure_future(one(row)) for row in rows]
            try:
                for finished in asyncio.as_completed(tasks):
                    row, text, usage, latency_ms, server_ms = await finished
                    no_usage = no_usage or usage is None
                    prompt_tokens, completion_tokens = usage or (0, 0)
                    scores = score_row(row, Observation(output=text))
                    details: dict[str, Any] = {k: {"score": v.score, "passed": v.passed, "reason": v.reason}
                                               for k, v in scores.items()}
                    on_result(RowResult(row.id, row.cohort, ref.name, model_hash, text, prompt_tokens,
                                        completion_tokens, latency_ms, min(v.score for v in scores.values()),
                                        all(v.passed for v in scores.values()), details, server_ms))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if no_usage:
            warnings.warn(f"model '{ref.name}' ({ref.url}): the server sent no usage; token counts recorded as 0",
                          stacklevel=2)

    asyncio.run(go())


def _read_answer(ref: ModelRef, row: SuiteRow, response: Reply) -> tuple[str, tuple[int, int] | None, float | None]:
    """A row's answer: its text, its token counts (None when the server sent no usage) and the server's own timing
    of it (`_server_ms`); EvaluationError when it is not an OpenAI completion or its counts are not whole
    numbers >= 0."""
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
        return str(text), usage_counts(usage), _server_ms(data.get("timings"))
    except ValueError as exc:
        raise EvaluationError(f"{where}: {exc}") from None


def _server_ms(timings: Any) -> float | None:
    """The milliseconds a server says it spent on the answer (llama.cpp's `timings`: reading the prompt and
    generating), without its queue; None when it says nothing readable (it only informs: never an error)."""
    if not isinstance(timings, dict):
        return None
    parts = [timings.get("prompt_ms"), timings.get("predicted_ms")]
    readable = [float(p) for p in parts if isinstance(p, (int, float)) and not isinstance(p, bool)]
    if len(readable) != len(parts) or not all(math.isfinite(p) and p >= 0 for p in readable):
        return None
    return sum(readable)


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
