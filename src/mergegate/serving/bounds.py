"""What an OpenAI-compatible server sends back, taken only within bounds: one rule for every caller of such a
server (`serving.client`, and the gateway's upstream backend over its own connection pool).

- An answer is read as a stream and refused once it passes `answer_limit(max_tokens)` bytes: what was asked
  for (max tokens × BYTES_PER_TOKEN, generous for any tokenizer's longest token, JSON-escaped) plus a fixed
  ENVELOPE_BYTES for the JSON around it. A server that sends megabytes for a 64-token request then costs
  neither memory nor a stored row.
- `usage` token counts are whole numbers in [0, MAX_TOKEN_COUNT]; anything else is refused naming the field and
  the value (they reach cost reports and gate rules).
- Text taken from a server's answer and shown to a person (an error's message, in a caller's error, a log, a trace or
  the registry) has the credentials it was sent redacted, whole or in part, and any Authorization credential it
  quotes (`redacted`); `upstream_text` also makes it one line of at most UPSTREAM_TEXT_LIMIT characters.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator, Iterable

BYTES_PER_TOKEN = 256
ENVELOPE_BYTES = 64 * 1024
MAX_TOKEN_COUNT = 2**31 - 1  # far beyond any context; also what SQLite and JSON consumers take without overflow
UPSTREAM_TEXT_LIMIT = 300  # characters of a server's text kept in a message
MIN_FRAGMENT = 8  # this many characters of a secret in a row are redacted as the secret
REDACTED = "[redacted]"
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)\s+[^\s\"',;}]+")  # what an Authorization header carries


class AnswerTooLarge(ValueError):
    """An answer passed the bytes allowed for it."""

    def __init__(self, limit: int, allowed_for: str = "it"):
        self.limit, self.allowed_for = limit, allowed_for
        super().__init__(f"the answer passed {limit:,} bytes, the most accepted for {allowed_for}; refused")

    def __reduce__(self):  # pickles with both arguments (the default passes only the message)
        return type(self), (self.limit, self.allowed_for)


def answer_limit(max_tokens: int) -> int:
    """The most bytes accepted for an answer to a request for at most `max_tokens` tokens."""
    return max(0, max_tokens) * BYTES_PER_TOKEN + ENVELOPE_BYTES


async def read_limited(chunks: AsyncIterator[bytes], limit: int, *, cut: bool = False,
                       allowed_for: str = "it") -> bytes:
    """The bytes of a streamed answer, at most `limit` of them: past it AnswerTooLarge (saying what the limit is
    `allowed_for`), or with `cut` the first `limit` bytes (for an error's body, of which only the start is shown).
    Reading stops there either way."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            if cut:
                parts.append(chunk[: len(chunk) - (size - limit)])
                break
            raise AnswerTooLarge(limit, allowed_for)
        parts.append(chunk)
    return b"".join(parts)


def usage_counts(usage: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from an answer's `usage`, None when it has none. A count that is absent
    or null is 0; any other that is not a whole number in [0, MAX_TOKEN_COUNT] raises ValueError naming the field
    and its value."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise ValueError(f"usage is {_shown(usage)}, not an object")
    return _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")


def _count(usage: dict, field: str) -> int:
    value = usage.get(field)
    if value is None:
        return 0
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not 0 <= value <= MAX_TOKEN_COUNT:
        raise ValueError(f"usage.{field} is {_shown(value)}, not a whole number of tokens in [0, {MAX_TOKEN_COUNT}]")
    return int(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def redacted(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every non-empty secret in it — whole, or MIN_FRAGMENT or more of its characters in a row — and
    any Authorization credential it quotes ("Bearer …") replaced by REDACTED."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = _without(text, secret)
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def upstream_text(content: bytes | str, secrets: Iterable[str | None] = (),
                  limit: int = UPSTREAM_TEXT_LIMIT) -> str:
    """A server's text (bytes decoded as UTF-8, errors replaced) as shown to a person: `redacted`, its whitespace
    runs made one space, cut to `limit` characters (a cut ends in "…")."""
    keys = [s for s in secrets if s]
    # redacted before it is cut, over a window wide enough that a secret straddling the limit is found whole
    window = max((len(k) for k in keys), default=0) + len(REDACTED) + limit
    head = content[: 4 * window] if isinstance(content, bytes) else content
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    text = " ".join(redacted(text[:window], keys).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _without(text: str, secret: str) -> str:
    """`text` with `secret`, and each run of at least MIN_FRAGMENT of its characters, replaced by REDACTED."""
    text = text.replace(secret, REDACTED)
    if len(secret) <= MIN_FRAGMENT:
        return text
    starts = {secret[i:i + MIN_FRAGMENT] for i in range(len(secret) - MIN_FRAGMENT + 1)}
    kept, i = [], 0
    while i < len(text):
        if text[i:i + MIN_FRAGMENT] in starts:
            end = i + MIN_FRAGMENT
            while end < len(text) and text[i:end + 1] in secret:
                end += 1
            kept.append(REDACTED)
            i = end
        else:
            kept.append(text[i])
            i += 1
    return "".join(kept)
