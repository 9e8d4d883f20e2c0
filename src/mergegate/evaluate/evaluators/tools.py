"""Tool calls: which tool an answer calls, with which arguments (`tool_selection`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .base import EvalResult, Observation, _verdict
from .exact import _EDGE, _normalize

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


def named_tool(text: str) -> str:
    """The tool an answer names: its first word, without surrounding punctuation or brackets."""
    words = text.split()
    return words[0].strip(_EDGE + "()[]{}") if words else ""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | None  # None: the answer named the tool without giving arguments


_CALL = re.compile(r"\s*`?([A-Za-z_][\w.-]*)`?\s*\((.*)\)`?\s*$", re.DOTALL)
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def _arguments(value: Any, where: str) -> tuple[dict[str, Any] | None, str]:
    """Arguments given as an object or as a JSON string holding one (OpenAI sends a string)."""
    if value is None:
        return {}, ""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None, f"{where}: arguments are not valid JSON"
    if not isinstance(value, dict):
        return None, f"{where}: arguments are not a JSON object"
    return value, ""


def _json_tool_calls(value: Any) -> tuple[list[ToolCall], str]:
    """Tool calls in an OpenAI message ({"tool_calls": [...]}), one bare call ({"name", "arguments"}), or a list of
    either kind of call; ([], why) when the JSON is none of these."""
    if isinstance(value, dict) and "tool_calls" in value:
        value = value["tool_calls"]
        if not isinstance(value, list):
            return [], "'tool_calls' is not a list"
    items = value if isinstance(value, list) else [value]
    calls = []
    for index, item in enumerate(items):
        where = f"tool call {index + 1}"
        if isinstance(item, dict) and isinstance(item.get("function"), dict):  # {"type": "function", "function": ...}
            item = item["function"]
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            return [], f"{where}: no function name (expected {{\"name\": ..., \"arguments\": ...}})"
        arguments, why = _arguments(item.get("arguments", item.get("parameters")), where)
        if arguments is None:
            return [], why
        calls.append(ToolCall(item["name"].strip(), arguments))
    if not calls:
        return [], "no tool calls"
    return calls, ""


def _keyword_arguments(text: str) -> dict[str, Any] | None:
    """`key=value, ...` as Python would read it; bare words (city=Oslo) are taken as strings. None if not that form."""
    import ast

    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        call = None
    if isinstance(call, ast.Call) and not call.args and all(k.arg for k in call.keywords):
        arguments: dict[str, Any] = {}
        for keyword in call.keywords:
            try:
                arguments[str(keyword.arg)] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError, RecursionError):
                arguments[str(keyword.arg)] = ast.get_source_segment(f"f({text})", keyword.value)
        return arguments
    pairs = [part.partition("=") for part in text.split(",")]  # the lenient reading: key=unquoted text
    if all(sep and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", key) for key, sep, _ in pairs):
        return {key.strip(): value.strip().strip("\"'") for key, _, value in pairs}
    return None


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str]:
    """The tool calls an answer makes, in any of the accepted forms; ([], why) when it makes none.

    Forms: OpenAI JSON (a message with `tool_calls`, a bare {"name", "arguments"} call, a list of them, possibly in a
    ``` fence); the call form `name(key=value, ...)` or `name({"key": ...})`; or the tool's name as the first word
    (`search`, `weather: Oslo`), which names the tool without arguments.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if stripped[:1] in "{[" and stripped:
        try:
            value = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            value = None
        if value is not None:
            return _json_tool_calls(value)
    call = _CALL.match(stripped)
    if call:
        name, inner = call.group(1), call.group(2).strip()
        if not inner:
            return [ToolCall(name, {})], ""
        if inner.startswith("{"):
            arguments, why = _arguments(inner, f"{name}(...)")
            return ([ToolCall(name, arguments)], "") if arguments is not None else ([], why)
        keywords = _keyword_arguments(inner)
        if keywords is not None:
            return [ToolCall(name, keywords)], ""
        return [], f"{name}(...): arguments are neither key=value pairs nor a JSON object"
    named = named_tool(stripped)
    return ([ToolCall(named, None)], "") if named else ([], "names no tool")


def _same_value(got: Any, want: Any) -> bool:
    """Equal as JSON values; strings up to case, spacing and surrounding punctuation; 3 == 3.0 but True != 1."""
    if isinstance(want, str) and isinstance(got, str):
        return _normalize(got) == _normalize(want)
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return float(got) == float(want)
    if isinstance(want, dict) and isinstance(got, dict):
        return set(got) == set(want) and all(_same_value(got[k], want[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(_same_value(g, w) for g, w in zip(got, want))
    return bool(got == want)


def check_tool_call(output: str, *, expected: str | None, tools: Sequence[str] | None,
                    parameters: dict[str, dict[str, Any]] | None = None,
                    expected_arguments: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Whether `output` calls the expected tool (any listed tool when `expected` is None) correctly.

    Every call must name a listed tool (when tools are listed); the expected tool must be among the calls; its
    arguments must satisfy the tool's parameter schema (when given: required ones present, types right) and hold
    each of `expected_arguments` with that value. A bare name gives no arguments, so it fails a tool with required
    parameters or a case with expected arguments.
    """
    calls, why = parse_tool_calls(output)
    want = f"; expected {expected!r}" if expected else ""
    if not calls:
        return False, f"{why}{want}"
    names = [c.name for c in calls]
    if tools is not None:
        unlisted = [n for n in names if n not in tools]
        if unlisted:
            return False, f"named {unlisted[0]!r}, which is not among the listed tools ({', '.join(tools)})"
    if expected is None:
        return True, f"named {names[0]!r}" if len(names) == 1 else f"named {', '.join(map(repr, names))}"
    call = next((c for c in calls if c.name == expected), None)
    if call is None:
        return False, f"expected tool {expected!r}, got {', '.join(map(repr, names))}"
    schema = (parameters or {}).get(expected)
    needs_arguments = expected_arguments is not None or bool(schema and schema.get("required"))
    if call.arguments is None:
        if needs_arguments:
            return False, f"named {expected!r} without arguments, but the case checks them"
        return True, f"named {expected!r}"
    if schema is not None:
        error = best_match(Draft202012Validator(schema).iter_errors(call.arguments))
        if error is not None:
            where = "" if error.json_path == "$" else f" at {error.json_path}"
            return False, f"called {expected!r} with arguments that break its parameters{where}: {error.message}"
    for key, value in (expected_arguments or {}).items():
        if key not in call.arguments:
            return False, f"called {expected!r} without argument {key!r} (expected {value!r})"
        if not _same_value(call.arguments[key], value):
            return False, f"called {expected!r} with {key}={call.arguments[key]!r}, expected {value!r}"
    checked = " and its arguments" if schema is not None or expected_arguments else ""
    return True, f"called {expected!r}{checked}" if checked else f"named {expected!r}"


@dataclass(frozen=True)
class ToolSelection:
    """The output calls the expected tool (one of the listed ones) with the arguments the case requires.

    Accepted forms are those of `parse_tool_calls`. With OpenAI tool definitions in `tools`, the call's arguments
    are validated against the tool's parameter schema; `expected_arguments` pins values.
    """

    name: ClassVar[str] = "tool_selection"
    version: ClassVar[str] = "2"

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        passed, reason = check_tool_call(obs.output, expected=row.expected.strip(), tools=row.tools,
                                         parameters=row.tool_parameters, expected_arguments=row.expected_arguments)
        return _verdict(passed, reason)


# Refusal openers, matched anywhere in the lower-cased text. Kept tight on purpose: each is a phrase
# assistants use to decline, and the look-ahead skips "I can't help but notice ...".
