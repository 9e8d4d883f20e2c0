"""Eval suites: JSONL, one case per line. Malformed rows are reported together, by line number."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import SuiteError


class SuiteRow(BaseModel):
    """One evaluation case."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    cohort: str = Field(min_length=1)
    prompt: str
    expected: str
    evaluators: tuple[str, ...] = Field(min_length=1)
    context: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    tools: tuple[str, ...] | None = None

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
        if "json_schema" in self.evaluators and self.schema_ is None:
            raise ValueError("evaluator 'json_schema' needs a 'schema'")
        if self.schema_ is not None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(self.schema_)
            except SchemaError as exc:
                raise ValueError(f"'schema' is not a valid JSON Schema: {exc.message}") from None
        if "groundedness" in self.evaluators and not (self.context or "").strip():
            raise ValueError("evaluator 'groundedness' needs a 'context'")
        return self

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The row's `schema` field (named apart from pydantic's own `BaseModel.schema`)."""
        return self.schema_


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
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors()[:3])
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
