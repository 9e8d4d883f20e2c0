"""Eval suites: JSONL, one case per line. Malformed rows are reported together, by line number."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._yaml import error_message
from ..addresses import check_url
from ..errors import SuiteError


class JudgeSettings(BaseModel):
    """Where `llm_judge` sends a row: any OpenAI-compatible endpoint. Unset fields come from the environment
    (MERGEGATE_JUDGE_URL, MERGEGATE_JUDGE_MODEL, MERGEGATE_JUDGE_API_KEY_ENV) or the evaluator's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str | None = None  # checked by addresses.check_url, as every url
    model: str | None = Field(default=None, min_length=1)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable's name
    timeout_s: float | None = Field(default=None, gt=0, le=600)
    retries: int | None = Field(default=None, ge=0, le=10)

    @field_validator("base_url")
    @classmethod
    def _checked_url(cls, value: str | None) -> str | None:
        return check_url(value) if value is not None else None  # AddressError is a ValueError: the field is named


def _tool_definition(item: Any, where: str) -> tuple[str, dict[str, Any] | None]:
    """(name, parameters) of an OpenAI tool definition; ValueError saying what is wrong, at `where`."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a tool name or an OpenAI tool definition, got {type(item).__name__}")
    if item.get("type") != "function" or not isinstance(item.get("function"), dict):
        raise ValueError(f'{where}: an OpenAI tool definition is {{"type": "function", "function": {{"name": ...}}}}')
    function = item["function"]
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown or set(item) - {"type", "function"}:
        raise ValueError(f"{where}: unknown field(s) {unknown or sorted(set(item) - {'type', 'function'})}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.function.name: a non-empty string is required")
    schema = function.get("parameters")
    if schema is None:
        return name, None
    if not isinstance(schema, dict):
        raise ValueError(f"{where}.function.parameters: expected a JSON Schema object")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"{where}.function.parameters is not a valid JSON Schema: {exc.message}") from None
    return name, schema


class ChatMessage(BaseModel):
    """One message of a chat row (OpenAI's chat format, text content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str


class SuiteRow(BaseModel):
    """One evaluation case. The model is asked a `prompt` (completed as raw text) or `messages` (a chat, rendered
    with the model's chat template, or sent to a server's /chat/completions): exactly one of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    cohort: str = Field(min_length=1)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = Field(default=None, min_length=1)
    expected: str
    evaluators: tuple[str, ...] = Field(min_length=1)
    context: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # `tools` is given as tool names or OpenAI tool definitions ({"type": "function", "function": {"name",
    # "parameters"}}); it is kept as the names, and each definition's parameters (a JSON Schema) go to
    # `tool_parameters`, so code that only needs the names (rollout, the gateway) never sees the difference.
    tools: tuple[str, ...] | None = None
    tool_parameters: dict[str, dict[str, Any]] | None = None
    expected_arguments: dict[str, Any] | None = None  # tool_selection: these arguments, with these values
    rubric: str | None = None  # llm_judge: what the judge grades the answer against
    judge: JudgeSettings | None = None  # llm_judge: this row's endpoint, overriding the environment's

    @model_validator(mode="before")
    @classmethod
    def _tool_definitions(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
            return data
        if "tool_parameters" in data:
            raise ValueError("give tool parameters inside 'tools' as OpenAI tool definitions, not as 'tool_parameters'")
        names, parameters = [], {}
        for index, item in enumerate(data["tools"]):
            if isinstance(item, str):
                names.append(item)
                continue
            name, schema = _tool_definition(item, f"tools[{index}]")
            names.append(name)
            if schema is not None:
                parameters[name] = schema
        if len(set(names)) != len(names):
            raise ValueError(f"'tools' names a tool twice: {names}")
        return {**data, "tools": names, "tool_parameters": parameters or None}

    @field_validator("evaluators")
    @classmethod
    def _known_evaluators(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        from .evaluators import EVALUATORS

        unknown = [n for n in names if n not in EVALUATORS]
        if unknown:
            raise ValueError(f"unknown evaluator(s) {unknown}; available: {', '.join(sorted(EVALUATORS))}")
        return names

    @model_validator(mode="after")
    def _inputs_for_evaluators(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row needs exactly one of 'prompt' (text) or 'messages' (a chat)")
        if "json_schema" in self.evaluators and self.schema_ is None:
            raise ValueError("evaluator 'json_schema' needs a 'schema'")
        if self.schema_ is not None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(self.schema_)
            except SchemaError as exc:
                raise ValueError(f"'schema' is not a valid JSON Schema: {exc.message}") from None
        for name in ("groundedness", "hallucination"):
            if name in self.evaluators and not (self.context or "").strip():
                raise ValueError(f"evaluator '{name}' needs a 'context'")
        if "llm_judge" in self.evaluators and not (self.rubric or "").strip():
            raise ValueError("evaluator 'llm_judge' needs a 'rubric'")
        if self.expected_arguments is not None:
            if "tool_selection" not in self.evaluators:
                raise ValueError("'expected_arguments' is checked by evaluator 'tool_selection', which the row lacks")
            schema = (self.tool_parameters or {}).get(self.expected.strip())
            if schema is not None:  # a suite whose own expectation breaks the tool's schema is a suite bug
                from jsonschema import Draft202012Validator
                from jsonschema.exceptions import best_match

                error = best_match(Draft202012Validator(schema).iter_errors(self.expected_arguments))
                if error is not None:
                    raise ValueError(f"'expected_arguments' do not fit tool {self.expected.strip()!r}'s parameters: "
                                     f"{error.message}")
        return self

    @property
    def asked(self) -> str:
        """What the model is asked, as one text (for judges, classifiers, reports): the prompt, or the chat's
        messages as "role: content" lines."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages or ())

    def chat(self) -> list[dict[str, str]] | None:
        """The messages as OpenAI's plain dicts (for a chat template or a request body); None for a prompt row."""
        return None if self.messages is None else [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The row's `schema` field (named apart from pydantic's own `BaseModel.schema`)."""
        return self.schema_


def answer_budget(expected_tokens: int, max_new_tokens: int) -> int:
    """The new tokens a row may generate, given the token count of its `expected`: a correct answer is about as
    long as the expected one, so twice that plus slack bounds the generation without cutting an answer that
    could still be right; never more than `max_new_tokens`. Each row has its own, so its answer does not
    depend on which rows share its batch or the server's queue."""
    return min(max_new_tokens, 2 * expected_tokens + 8)


@dataclass(frozen=True)
class Suite:
    path: Path | None
    rows: tuple[SuiteRow, ...]
    sha256: str  # of the file's bytes: identical inputs ⇔ identical hash

    @property
    def cohorts(self) -> list[str]:
        return list(dict.fromkeys(row.cohort for row in self.rows))

    def by_cohort(self, cohort: str) -> list[SuiteRow]:
        return [row for row in self.rows if row.cohort == cohort]


def load_suite(path: str | Path, *, max_errors: int = 10) -> Suite:
    """Read a JSONL suite. Every malformed line is reported at once, by line number: invalid UTF-8 (a leading
    UTF-8 byte-order mark is accepted), invalid JSON, a row that is not an object or fails validation, and a
    duplicate id (with the line of its first use). Raises SuiteError; never another exception."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite {path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SuiteError(f"suite {path}: cannot be read ({exc.strerror or exc})") from None
    rows, errors = [], []
    first_line: dict[str, int] = {}
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    for number, chunk in enumerate(body.split(b"\n"), start=1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(f"line {number}: not valid UTF-8 (byte 0x{chunk[exc.start]:02x} at column {exc.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except (ValueError, RecursionError) as exc:  # e.g. an integer past Python's digit limit, deep nesting
            errors.append(f"line {number}: not usable JSON ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if not isinstance(data, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(data).__name__}")
            continue
        try:
            row = SuiteRow.model_validate(data)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {error_message(e)}"
                               for e in exc.errors()[:3])
            errors.append(f"line {number}: {detail}")
            continue
        except RecursionError:
            errors.append(f"line {number}: nested too deeply")
            continue
        if row.id in first_line:
            errors.append(f"line {number}: duplicate id {row.id!r} (first used on line {first_line[row.id]})")
            continue
        first_line[row.id] = number
        rows.append(row)
    if len(errors) == 1:
        raise SuiteError(f"suite {path}: {errors[0]}")
    if errors:
        shown = errors[:max_errors] + ([f"… and {len(errors) - max_errors} more"] if len(errors) > max_errors else [])
        raise SuiteError(f"suite {path}: {len(errors)} malformed row(s):\n  " + "\n  ".join(shown))
    if not rows:
        raise SuiteError(f"suite {path}: no rows")
    return Suite(path, tuple(rows), hashlib.sha256(raw).hexdigest())
