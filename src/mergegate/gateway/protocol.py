"""The OpenAI wire format: request schemas, the internal generation request, response and stream-chunk bodies.

Unknown request fields are accepted and ignored (clients send many optional ones, e.g. `tools`, `user`,
`logprobs`); fields that would change the answer in a way the gateway cannot honour are refused (`n` > 1,
token-array prompts). The fields the gateway reads are checked strictly, as OpenAI does: types are not coerced
("0.7" is not a temperature, true is not a max_tokens) and values must lie in OpenAI's ranges (temperature
0-2, top_p in (0, 1], seed a signed 64-bit integer, at most 4 non-empty stop sequences, ...), so that a bad
value is a 400 here and never an error inside a model.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .bodies import load_json
from .errors import APIError, validation_error

Operation = Literal["chat", "text_completion"]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_STOP_CHARS = 256  # per stop sequence

Str = Annotated[str, Field(strict=True)]
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int is a valid float, as in JSON
Bool = Annotated[bool, Field(strict=True)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Str
    text: Str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Str = Field(min_length=1, max_length=256)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: Int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stop: Str | list[Str] | None = None
    seed: Int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Float | None = Field(None, ge=-2, le=2)  # accepted and ignored, as OpenAI bounds them
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    metadata: dict[Annotated[Str, Field(max_length=64)], Annotated[Str, Field(max_length=512)]] | None = \
        Field(None, max_length=16)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return stops


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Str | list[Str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt string is supported")
            return value[0]
        return value


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class GenRequest:
    """What a backend is asked: chat messages or a prompt, plus sampling parameters."""

    operation: Operation
    params: GenParams
    messages: tuple[dict[str, str], ...] = ()  # {"role", "content"} with text content
    prompt: str = ""
    hops: tuple[str, ...] = ()  # the gateways this request passed through, this one last (hops.py)

    def routing_text(self) -> str:
        """The text the cohort classifier reads: the last user message, or the prompt."""
        if self.operation == "text_completion":
            return self.prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


@dataclass
class Completion:
    """One backend's answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    response_id: str = field(default_factory=lambda: f"gen-{uuid.uuid4().hex[:24]}")
    response_model: str | None = None  # the name the backend reported, if any


def parse_body(raw: bytes, kind: Operation) -> ChatRequest | CompletionRequest:
    """Raw bytes → validated request, or an APIError (4xx) naming the offending parameter. Never raises
    anything else, whatever the bytes."""
    data = load_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "text_completion" and isinstance(data.get("prompt"), list) and data["prompt"] \
            and not all(isinstance(p, str) for p in data["prompt"]):
        raise APIError(400, "Token-array prompts are not supported; send the prompt as a string.", param="prompt",
                       code="invalid_value")
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise request_error(exc) from None


def request_error(exc: ValidationError) -> APIError:
    """A chat/completions body that failed its schema, as OpenAI's 400 (n is always 1 here)."""
    return validation_error(exc, {"n": "Only n=1 is supported."})


def check_prompt_chars(characters: int, config, param: str) -> None:
    """Refuse a prompt longer than `config.max_prompt_chars` (400 naming the limit), before anything tokenizes it."""
    limit = config.max_prompt_chars
    if characters > limit:
        raise APIError(400, f"This request's {param} is {characters} characters, above this gateway's limit of "
                            f"{limit} characters (max_prompt_chars). Shorten the {param}.", param=param,
                       code="context_length_exceeded")


def to_gen_request(body: ChatRequest | CompletionRequest, config) -> GenRequest:
    """The validated request as a backend request, with max_tokens defaulted and bounded and the prompt's length
    bounded (`check_prompt_chars`)."""
    default = min(config.default_max_tokens, config.max_tokens_limit)
    asked = getattr(body, "max_completion_tokens", None)
    param = "max_completion_tokens" if asked else "max_tokens"
    max_tokens = asked or body.max_tokens or default
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"{param} is {max_tokens}, above this gateway's limit of {config.max_tokens_limit}.",
                       param=param, code="invalid_value")
    params = GenParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                       stop=tuple(body.stop or ()), seed=body.seed)
    if isinstance(body, ChatRequest):
        messages = tuple({"role": m.role, "content": m.text()} for m in body.messages)
        check_prompt_chars(sum(len(m["content"]) for m in messages), config, "messages")
        return GenRequest("chat", params, messages=messages)
    prompt = body.prompt  # the validator reduced a one-element list to its string
    assert isinstance(prompt, str)
    check_prompt_chars(len(prompt), config, "prompt")
    return GenRequest("text_completion", params, prompt=prompt)


# -- responses ---------------------------------------------------------------------------------------------

def new_id(operation: Operation) -> str:
    return f"{'chatcmpl' if operation == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def response_body(operation: Operation, request_id: str, model: str, c: Completion) -> dict[str, Any]:
    created = int(time.time())
    if operation == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason}
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage(c)}
    choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(c)}


class ChunkWriter:
    """Server-sent events in OpenAI's chunk format for one streamed answer."""

    def __init__(self, operation: Operation, request_id: str, model: str):
        self.operation, self.request_id, self.model = operation, request_id, model
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if self.operation == "chat" else "text_completion"
        body = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.operation == "chat":
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> str | None:
        """Chat streams open with the assistant role; completion streams have no opener."""
        return self._chunk([self._choice("", None, role=True)]) if self.operation == "chat" else None

    def text(self, delta: str) -> str:
        return self._chunk([self._choice(delta, None)])

    def finish(self, finish_reason: str) -> str:
        return self._chunk([self._choice(None, finish_reason)])

    def usage(self, c: Completion) -> str:
        return self._chunk([], usage=usage(c))

    @staticmethod
    def error(err: APIError) -> str:
        return f"data: {json.dumps(err.body())}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
