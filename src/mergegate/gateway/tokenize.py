"""`POST /tokenize`, vLLM's shape: what a plan model's tokenizer makes of a prompt (or chat messages).

Request `{"model", "prompt", "add_special_tokens" (default true)}` or `{"model", "messages",
"add_generation_prompt" (default true), "add_special_tokens" (default false)}` — the messages rendered with the
model's chat template, as vLLM does. Answer `{"count", "max_model_len", "tokens"}`; `max_model_len` is the model
config's `max_position_embeddings` (null when it has none). The evaluation runner counts each row's budget with
it (evaluate.endpoint), so a model evaluated through the gateway gets the budgets it gets in process.
A prompt (or the messages' text) longer than the gateway's `max_prompt_chars` is refused before it is tokenized,
and a local model tokenizes in a worker thread, as it generates: the event loop keeps answering meanwhile.

A local model is tokenized here with its own tokenizer. A url model's request is forwarded to its upstream's
`{root}/tokenize` (root: the url without `/v1`), renamed to the upstream's model; an upstream without one is a
404 saying that model's tokenizer is not available here. Only the plan's models are tokenized: a cohort route
or `mergegate` may be answered by several models with different tokenizers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..serving.bounds import ENVELOPE_BYTES, AnswerTooLarge, read_limited, upstream_text
from ..serving.client import ERROR_BYTES
from .backends import Backend, LocalBackend, RemoteBackend
from .bodies import load_json
from .errors import APIError
from .hops import HOP_HEADER, hop_header
from .protocol import Bool, ChatMessage, Str, check_prompt_chars, request_error


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Str = Field(min_length=1, max_length=256)
    prompt: Str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: Bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


def parse_tokenize(raw: bytes, config) -> TokenizeRequest:
    """Raw bytes → a validated request, or a 400 APIError naming the parameter (a prompt longer than the gateway's
    `max_prompt_chars` too: tokenizing takes time in proportion to it)."""
    data = load_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        body = TokenizeRequest.model_validate(data)
    except ValidationError as exc:
        raise request_error(exc) from None
    if body.messages is not None:
        check_prompt_chars(sum(len(m.text()) for m in body.messages), config, "messages")
    else:
        check_prompt_chars(len(body.prompt or ""), config, "prompt")
    return body


def not_available(model: str, why: str) -> APIError:
    return APIError(404, f"The tokenizer of model '{model}' is not available here: {why}.", param="model",
                    code="tokenizer_not_available")


async def tokenize(backend: Backend, body: TokenizeRequest, hops: tuple[str, ...] = ()) -> dict[str, Any]:
    """`hops`: the gateways the request passed through, this one last (sent upstream: hops.py)."""
    if isinstance(backend, LocalBackend):  # in a thread, as generation is: the event loop keeps serving
        return await asyncio.to_thread(_local, backend, body)
    if isinstance(backend, RemoteBackend):
        return await _forward(backend, body, hops)
    raise not_available(backend.name, f"its backend ({backend.kind}) has no tokenizer")


def _local(backend: LocalBackend, body: TokenizeRequest) -> dict[str, Any]:
    tokenizer = backend.tokenizer
    if tokenizer is None:
        raise APIError(503, f"Model '{backend.name}' is not loaded.", type="server_error", code="model_not_loaded")
    if body.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"Model '{backend.name}' has no chat template to render 'messages' with; send a "
                                "'prompt'.", param="messages", code="invalid_value")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # a template that rejects these messages: the request's fault
            raise APIError(400, f"The messages cannot be rendered for model '{backend.name}': "
                                f"{type(exc).__name__}: {exc}", param="messages", code="invalid_value") from None
        special = bool(body.add_special_tokens)
    else:
        assert body.prompt is not None
        text, special = body.prompt, body.add_special_tokens is not False
    tokens = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    config = getattr(backend.model, "config", None)
    max_len = getattr(config, "max_position_embeddings", None)
    return {"count": len(tokens), "max_model_len": max_len if isinstance(max_len, int) else None, "tokens": tokens}


def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _tokens_limit(body: TokenizeRequest) -> int:
    """The most bytes accepted for an upstream's answer to `body`: a token per byte of its text at most (byte-level
    tokenizers), each written as a number of up to a dozen characters, plus the answer's envelope."""
    text = body.prompt if body.prompt is not None else "".join(m.text() for m in body.messages or ())
    return len(text.encode()) * 12 + ENVELOPE_BYTES


async def _forward(backend: RemoteBackend, body: TokenizeRequest, hops: tuple[str, ...]) -> dict[str, Any]:
    """The upstream's answer to the same request (its model name swapped in). Its 4xx is passed on, but for a
    refusal of the gateway's own credentials (401, 403: this gateway's configuration, not the caller's request)
    and 5xx, which are 502s; its message redacted of the key the upstream is sent. The whole exchange is bounded
    as every upstream call is: within the backend's timeout from connect to last byte, and no larger than the
    prompt allows (`_tokens_limit`; an error's body is cut)."""
    payload = {**body.model_dump(exclude_none=True), "model": backend.upstream_model}
    client = backend._http()
    limit = _tokens_limit(body)
    try:
        async with asyncio.timeout(backend.timeout):
            async with client.stream("POST", _root(backend.url) + "/tokenize", json=payload,
                                     headers={HOP_HEADER: hop_header(hops)} if hops else None) as streamed:
                content = await read_limited(streamed.aiter_bytes(), limit if streamed.status_code < 400 else
                                             ERROR_BYTES, cut=streamed.status_code >= 400,
                                             allowed_for="this prompt")
        response = httpx.Response(streamed.status_code, content=content, headers=streamed.headers)
    except TimeoutError:
        raise APIError(502, f"The upstream of model '{backend.name}' sent no complete answer to /tokenize within "
                            f"{backend.timeout:g} s.", type="server_error", code="upstream_error") from None
    except AnswerTooLarge as exc:
        raise APIError(502, f"The upstream of model '{backend.name}' answered /tokenize: {exc}.",
                       type="server_error", code="upstream_error") from None
    except httpx.HTTPError as exc:
        raise APIError(502, f"The upstream of model '{backend.name}' could not be reached for /tokenize "
                            f"({type(exc).__name__}).", type="server_error", code="upstream_error") from None
    if response.status_code in (404, 405):
        raise not_available(backend.name, "its upstream has no /tokenize")
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) and \
            isinstance(data.get("error"), dict) else None
        status = 502 if response.status_code >= 500 or response.status_code in (401, 403) else response.status_code
        if response.status_code == 508:  # the loop hops.py refuses, passed back along it
            status = 508
        detail = upstream_text(str(message) if message else response.content, [backend.api_key])
        raise APIError(status, f"The upstream of model '{backend.name}' refused /tokenize (HTTP "
                               f"{response.status_code}): {detail}",
                       type="invalid_request_error" if status < 500 else "server_error",
                       code="loop_detected" if status == 508 else "upstream_error")
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise APIError(502, f"The upstream of model '{backend.name}' answered /tokenize without a token list.",
                       type="server_error", code="upstream_error")
    return data
