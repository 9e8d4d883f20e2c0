"""What an upstream server wrote, made fit to show: its credentials redacted, its size bounded, on one line.

An upstream's error body may quote the API key it was sent (some answer a 401 with "Incorrect API key provided:
sk-…"), and it is only text from another server: whatever of it reaches a caller's error, a log, a trace or the
registry goes through `upstream_text` first.
"""

from __future__ import annotations

import re
from typing import Iterable

UPSTREAM_TEXT_LIMIT = 300  # characters of an upstream's text kept in a message
MIN_FRAGMENT = 8  # this many characters of a secret in a row are redacted as the secret
REDACTED = "[redacted]"
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[^\s\"',;}]+")  # any credential an Authorization header carries


def upstream_text(content: bytes | str, secrets: Iterable[str | None] = (),
                  limit: int = UPSTREAM_TEXT_LIMIT) -> str:
    """`content` decoded (UTF-8, errors replaced), every secret in `secrets` redacted wherever it appears whole or
    as `MIN_FRAGMENT` or more of its characters in a row, any Authorization credential redacted, whitespace runs
    made one space, and cut to `limit` characters (a cut ends in "…")."""
    keys = [s for s in secrets if s]
    # redact before cutting, over a window wide enough that a secret straddling the limit is still found whole
    window = max((len(k) for k in keys), default=0) + len(REDACTED) + limit
    text = content[: 4 * window] if isinstance(content, bytes) else content[:window]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for key in sorted(keys, key=len, reverse=True):
        text = _without(text[:window], key)
    text = " ".join(_BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text).split())
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
