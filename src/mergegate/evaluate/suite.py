"""Eval suites: JSONL, one case per line. Malformed rows are reported together, by line number."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MergegateError


class SuiteError(MergegateError, ValueError):
    """An eval suite file is malformed."""


class SuiteRow(BaseModel):
    """One evaluation case."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
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
        if "groundedness" in self.evaluators and not (self.context or "").strip():
            raise ValueError("evaluator 'groundedness' needs a 'context'")
        return self

    @property
    def schema(self) -> dict[str, Any] | None:
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
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite {path}: no such file")
    raw = path.read_bytes()
    rows, errors = [], []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(data, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(data).__name__}")
            continue
        try:
            rows.append(SuiteRow.model_validate(data))
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors()[:3])
            errors.append(f"line {number}: {detail}")
    duplicates = [row_id for row_id, count in Counter(r.id for r in rows).items() if count > 1]
    if duplicates:
        errors.append(f"duplicate ids: {', '.join(duplicates[:5])}")
    if errors:
        shown = errors[:max_errors] + ([f"… and {len(errors) - max_errors} more"] if len(errors) > max_errors else [])
        raise SuiteError(f"suite {path}: {len(errors)} malformed row(s):\n  " + "\n  ".join(shown))
    if not rows:
        raise SuiteError(f"suite {path}: no rows")
    return Suite(path, tuple(rows), hashlib.sha256(raw).hexdigest())
