"""Reading and decoding request bodies within bounds, for the API and the admin endpoints alike.

A body is read up to a byte limit (413 beyond it, whether or not Content-Length was sent), then decoded as
JSON with bounded number literals (no 5,000-digit integers, no NaN/Infinity, no 1e999), bounded nesting and
no lone UTF-16 surrogates in strings. Anything else is a 400 `APIError`, never another exception: a request
the gateway cannot read is the caller's problem, and answering it must leave the connection usable.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import APIError

MAX_JSON_DEPTH = 64  # containers inside containers; OpenAI requests (tools' JSON schemas included) need far fewer
MAX_NUMBER_CHARS = 64  # characters in one number literal: int64 seeds need 20, any float 25

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # how a lone surrogate can get into a JSON string


async def read_body(request, limit: int) -> bytes:
    """The request body, or a 413 once it passes `limit` bytes (declared or actually sent)."""
    too_big = APIError(413, f"The request body is larger than this gateway's limit of {limit} bytes.",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _BadLiteral(ValueError):
    pass


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _BadLiteral(f"a number literal of {len(text)} characters (the limit is {MAX_NUMBER_CHARS})")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _BadLiteral(f"a number literal of {len(text)} characters (the limit is {MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise _BadLiteral(f"the number {text[:32]} is out of range")
    return value


def _constant(name: str):
    raise _BadLiteral(f"{name} is not a JSON value")


def load_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """UTF-8 bytes → a JSON value within this module's bounds, or a 400 `APIError` (code `invalid_json`)."""
    def invalid(why: str) -> APIError:
        return APIError(400, f"The request body is not valid JSON: {why}", code="invalid_json")

    try:
        text = raw.decode("utf-8")  # JSON over HTTP is UTF-8 (RFC 8259); json.loads would also guess UTF-16/32
    except UnicodeDecodeError as exc:
        raise invalid(f"it is not UTF-8 ({exc})") from None
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _BadLiteral as exc:
        raise invalid(str(exc)) from None
    except RecursionError:
        raise invalid(f"it nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise invalid(str(exc)) from None
    _check_value(value, max_depth, strings=_SURROGATE_ESCAPE.search(text) is not None, invalid=invalid)
    return value


def _check_value(value: Any, max_depth: int, *, strings: bool, invalid) -> None:
    """Depth within `max_depth`; with `strings`, no string (key or value) holding a lone surrogate, which
    no tokenizer, encoder or upstream can take."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                raise invalid(f"it nests deeper than {max_depth} levels")
            for key, child in item.items():
                if strings:
                    _check_string(key, invalid)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth >= max_depth:
                raise invalid(f"it nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif strings and isinstance(item, str):
            _check_string(item, invalid)


def _check_string(text: str, invalid) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff) that is not valid Unicode") from None
