"""A model reference: how every part of mergegate names a model — recipes, the CLI, evaluation, rollout plans.

Spellings (`ModelRef.parse`):

- `PATH` — a local Hugging Face folder, named after its folder;
- `NAME=PATH` — the same, named;
- `PATH+ADAPTER` (mergekit's spelling, also after `NAME=`) — the folder with a PEFT adapter on top;
- `NAME=http(s)://host:port/v1#served-model-name` — an OpenAI-compatible server, and the name that server
  knows the model by (default: NAME).

A text that exists as a path is a path, even with a `+` or `=` in it (as mergekit reads `+`).
"""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .errors import ModelRefError

Role = Literal["candidate", "base", "source"]  # a model's part in a release; kept beside its ModelRef

_REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ModelRef:
    """A named model: a local folder (optionally with a PEFT adapter folded on top) or a remote server's URL."""

    name: str
    path: Path | None = None
    _: KW_ONLY
    adapter: Path | None = None
    url: str | None = None  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    served_model: str | None = None  # the name the server knows the model by; None: `name`

    def __post_init__(self) -> None:
        # Paths given as text are normalised here so callers compare and hash one type.
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if self.adapter is not None and not isinstance(self.adapter, Path):
            object.__setattr__(self, "adapter", Path(self.adapter))
        if not isinstance(self.name, str) or not self.name.strip() or not self.name.isprintable():
            raise ModelRefError(f"model name {self.name!r}: a name must be non-empty printable text")
        if (self.path is None) == (self.url is None):
            raise ModelRefError(f"model '{self.name}': needs exactly one of a local path or a url")
        if self.url is not None and self.adapter is not None:
            raise ModelRefError(f"model '{self.name}': an adapter applies to a local folder, not to a url")
        if self.served_model is not None and self.url is None:
            raise ModelRefError(f"model '{self.name}': a served model name applies to a url, not to a local folder")

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @classmethod
    def parse(cls, text: str, *, name: str | None = None) -> ModelRef:
        """Read one spelling (module docstring). With `name` given, `text` is the location alone (no `NAME=`
        prefix is split off: a recipe's model reference is a path, whatever characters it holds).
        Raises ModelRefError naming the text; never another exception."""
        if not isinstance(text, str) or not text:
            raise ModelRefError(f"model reference {text!r}: empty")
        if "\0" in text:
            raise ModelRefError(f"model reference {text!r}: contains a NUL character")
        location = text
        if name is None and "=" in text and not _is_url(text) and not _exists(text):
            name, location = text.split("=", 1)
            if not name:
                raise ModelRefError(f"model reference {text!r}: empty name before '='")
        if not location:
            raise ModelRefError(f"model reference {text!r}: no path or url")
        try:
            if _is_url(location):
                if name is None:
                    raise ModelRefError(f"model reference {text!r}: a remote model needs a name (NAME=URL)")
                url, served_model = _split_url(location, text)
                return cls(name, url=url, served_model=served_model)
            path, adapter = location, None
            if "+" in location and not _exists(location):
                path, adapter = location.split("+", 1)
                if not path or not adapter:
                    raise ModelRefError(f"model reference {text!r}: PATH+ADAPTER needs both a model and an adapter")
            if name is None:
                name = Path(adapter or path).name
                if not name:
                    raise ModelRefError(f"model reference {text!r}: no name can be taken from the path "
                                        "(write NAME=PATH)")
            return cls(name, Path(path), adapter=Path(adapter) if adapter else None)
        except ModelRefError as exc:
            if repr(text) in str(exc):
                raise
            raise ModelRefError(f"model reference {text!r}: {exc}") from None

    def resolve(self, folder: Path | None = None) -> ModelRef:
        """Relative paths found as mergekit finds them: in the working directory first, then in `folder` (a
        recipe's folder); `~` expanded. A path found in neither stays as written (its reader names it)."""
        if self.path is None:
            return self
        return replace(self, path=_find(self.path, folder),
                       adapter=_find(self.adapter, folder) if self.adapter is not None else None)

    def __str__(self) -> str:
        """The spelling `parse` reads back."""
        if self.url is not None:
            return f"{self.name}={self.url}" + (f"#{self.served_model}" if self.served_model else "")
        return f"{self.name}={self.path}" + (f"+{self.adapter}" if self.adapter is not None else "")


def _is_url(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _REMOTE_SCHEMES


def _split_url(location: str, text: str) -> tuple[str, str | None]:
    """The base URL and the served model's name (the fragment), refused unless it has a scheme and a host."""
    if any(c.isspace() or not c.isprintable() for c in location):
        raise ModelRefError(f"model reference {text!r}: a url cannot contain spaces or control characters")
    url, _, served_model = location.partition("#")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise ModelRefError(f"model reference {text!r}: not a valid url ({exc})") from None
    if not parts.hostname:
        raise ModelRefError(f"model reference {text!r}: the url has no host")
    return url, served_model or None


def _exists(text: str) -> bool:
    try:
        return Path(os.path.expanduser(text)).exists()
    except (OSError, ValueError):  # a name too long for the file system, say: not an existing path
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _find(path: Path, folder: Path | None) -> Path:
    path = Path(os.path.expanduser(path))
    if _is_dir(path) or path.is_absolute() or folder is None:
        return path
    beside = Path(folder) / path
    return beside if _is_dir(beside) else path
