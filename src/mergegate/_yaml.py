"""YAML files into pydantic objects, one way for every loader (recipes, gate policies, rollout plans).

Every problem raises the loader's own error class with one line that starts with where it is — a file, or a
label such as "recipe" — then says what is wrong, in one format:

    WHERE: line 3: not valid UTF-8 (byte 0xe9 at column 15)
    WHERE: line 2, column 12: not valid YAML (mapping values are not allowed here)
    WHERE: expected a mapping of policy fields (confidence, ...), got list
    WHERE: field.path: message; other.field: message

Documents are refused above MAX_BYTES before they are parsed (parsing takes seconds and hundreds of bytes of
memory per byte), parsed with `yaml.safe_load` (no python/ or unknown tags), and refused when they nest deeper
than MAX_DEPTH or their aliases expand to more than MAX_NODES values (counted without expanding them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import MergegateError

MAX_BYTES = 1 << 20  # far beyond any recipe, policy, plan or space; MAX_NODES values fit in it
MAX_NODES = 100_000  # YAML aliases can make a small file a huge tree (billion laughs): refuse, don't expand
MAX_DEPTH = 100  # far beyond any real file; deeper trees only exhaust the stack of whatever walks them
MAX_ERRORS = 5  # validation errors named in one message
_BOM = b"\xef\xbb\xbf"

Model = TypeVar("Model", bound=BaseModel)


def read_yaml_file(path: Path, where: str, error_cls: type[MergegateError]) -> Any:
    """The document in a YAML file: UTF-8 (a leading byte-order mark is accepted), safely parsed, checked for
    size and depth. An empty file is None."""
    try:
        if not path.is_file():
            raise error_cls(f"{where}: no such file")
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise error_cls(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    _check_bytes(len(raw), where, error_cls)
    raw = raw.removeprefix(_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error_cls(f"{where}: line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})"
                        ) from None
    return parse_yaml(text, where, error_cls)


def parse_yaml(text: str, where: str, error_cls: type[MergegateError]) -> Any:
    """The document in YAML text, safely parsed and checked for size and depth."""
    _check_bytes(len(text.encode("utf-8", "surrogatepass")), where, error_cls)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:  # syntax errors, and tags such as !!python/object that safe_load refuses
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(f"{exc.problem or ''} {exc.context or ''}".split())
        raise error_cls(f"{where}: {at}not valid YAML ({problem})") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, other control characters)
        before = text[:exc.position]
        at = f"line {before.count(chr(10)) + 1}, column {len(before) - (before.rfind(chr(10)) + 1) + 1}: "
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise error_cls(f"{where}: {at}not valid YAML (character #x{char:04x}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise error_cls(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise error_cls(f"{where}: not valid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp that is not a date: 2024-02-30
        raise error_cls(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    check_size(data, where, error_cls)
    return data


def _check_bytes(size: int, where: str, error_cls: type[MergegateError]) -> None:
    if size > MAX_BYTES:
        raise error_cls(f"{where}: larger than {MAX_BYTES >> 20} MiB, the most a YAML input may hold (refused "
                        "unparsed)")


def check_size(data: Any, where: str, error_cls: type[MergegateError]) -> None:
    """Refuse a tree deeper than MAX_DEPTH or with more than MAX_NODES values, walked without recursion and
    without expanding aliases (a recursive alias is stopped by the count)."""
    stack, seen = [(data, 0)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise error_cls(f"{where}: the document expands to more than {MAX_NODES} values (YAML aliases?)")
        if depth > MAX_DEPTH:
            raise error_cls(f"{where}: nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in (*item.keys(), *item.values()))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)


def require_mapping(data: Any, where: str, error_cls: type[MergegateError], what: str) -> dict:
    """`data` if it is a mapping; else "expected a mapping of WHAT, got TYPE"."""
    if not isinstance(data, dict):
        raise error_cls(f"{where}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def validate(model_cls: type[Model], data: Any, where: str, error_cls: type[MergegateError], *,
             message: Callable[[ErrorDetails], str | None] | None = None, context: dict | None = None) -> Model:
    """`model_cls` validated from `data`; the first MAX_ERRORS errors as "field.path: message; ...".

    `message` may word an error its own way (return None to keep pydantic's message); `context` is pydantic's
    validation context (what a model needs besides the document, e.g. the folder it was read from)."""
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as exc:
        raise error_cls(f"{where}: {explain(exc, message)}") from None
    except RecursionError:
        raise error_cls(f"{where}: nested too deeply") from None


def explain(exc: ValidationError, message: Callable[[ErrorDetails], str | None] | None = None) -> str:
    parts = []
    for error in exc.errors()[:MAX_ERRORS]:
        field = field_path(error)
        text = (message(error) if message else None) or error_message(error)
        parts.append(f"{field}: {text}" if field else text)
    return "; ".join(parts)


def error_message(error: ErrorDetails) -> str:
    """One validation error's message as a sentence for a person: without the "Value error, " pydantic puts before
    a validator's own words, and a NaN called not a number (pydantic says it is out of the field's range)."""
    value = error.get("input")
    if isinstance(value, float) and math.isnan(value):
        return "NaN is not a number"
    return error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")


def field_path(error: ErrorDetails) -> str:
    """The error's location as `a.b.0.c`, without pydantic's validator and union-branch markers."""
    return ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "union[")))


def load_yaml_model(path: Path, model_cls: type[Model], *, where: str, what: str, error_cls: type[MergegateError],
                    empty: dict | None = None) -> Model:
    """A YAML file as `model_cls`: read, parsed, required to be a mapping (`empty` stands for an empty file,
    if given), validated. Every problem is one `error_cls` line starting with `where`."""
    data = read_yaml_file(Path(path), where, error_cls)
    if data is None and empty is not None:
        data = empty
    return validate(model_cls, require_mapping(data, where, error_cls, what), where, error_cls)
