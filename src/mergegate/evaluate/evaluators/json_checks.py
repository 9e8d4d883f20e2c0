"""JSON answers: valid JSON objects (`json_valid`) and objects a JSON Schema accepts (`json_schema`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from ...errors import SuiteError
from .base import EvalResult, Observation, _verdict

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def parse_json_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """Strictly parse the whole (stripped) output as a JSON object: (object, "") or (None, why not)."""
    try:
        value = json.loads(text.strip(), parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at char {exc.pos}"
    except ValueError as exc:  # NaN / Infinity, which Python accepts and JSON does not
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_JSON_TYPES.get(type(value), 'null')}"
    return value, ""


@dataclass(frozen=True)
class JsonValid:
    """The whole output is one JSON object."""

    name: ClassVar[str] = "json_valid"
    version: ClassVar[str] = "1"

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        obj, why = parse_json_object(obs.output)
        return _verdict(obj is not None, why or "valid JSON object")


@dataclass(frozen=True)
class JsonSchema:
    """The whole output is a JSON object valid against the row's schema (Draft 2020-12)."""

    name: ClassVar[str] = "json_schema"
    version: ClassVar[str] = "1"

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        if row.json_schema is None:
            raise SuiteError(f"row {row.id!r}: evaluator 'json_schema' needs a 'schema'")
        try:
            Draft202012Validator.check_schema(row.json_schema)
        except SchemaError as exc:
            raise SuiteError(f"row {row.id!r}: invalid JSON Schema: {exc.message}") from None
        obj, why = parse_json_object(obs.output)
        if obj is None:
            return _verdict(False, why)
        error = best_match(Draft202012Validator(row.json_schema).iter_errors(obj))  # the error `validate` would raise
        if error is None:
            return _verdict(True, "valid against the schema")
        where = "" if error.json_path == "$" else f" at {error.json_path}"
        return _verdict(False, f"schema{where}: {error.message}")
