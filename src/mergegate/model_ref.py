"""A model reference: how every part of mergegate names a model — recipes, the CLI, evaluation, rollout plans.

Spellings (`ModelRef.parse`):

- `PATH` — a local Hugging Face folder, named after its folder;
- `NAME=PATH` — the same, named;
- `PATH+ADAPTER` (mergekit's spelling, also after `NAME=`) — the folder with a PEFT adapter on top;
- `NAME=http(s)://host:port/v1#served-model-name` — an OpenAI-compatible server, and the name that server
  knows the model by (default: NAME).

A text that exists as a path is a path, even with a `+` or `=` in it (as mergekit reads `+`).

A models file (`load_models_file`) names references as YAML blocks — a folder (`path`, `adapter`) or a server
(`base_url`, `model`, and that server's own `api_key_env`, `concurrency`, `timeout_s`, `retries`, which override
the command's `EndpointSettings` for that model alone); `resolve_model_ref` reads a name from such a file, or
else any spelling above.
"""

from __future__ import annotations

import math
import os
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .addresses import check_url, without_credentials
from .errors import AddressError, ModelRefError

Role = Literal["candidate", "base", "source"]  # a model's part in a release; kept beside its ModelRef

_REMOTE_SCHEMES = ("http", "https")


class Secret:
    """A value that is never shown: its repr and str are *** (so no message, log line or traceback that shows
    the object holding it shows it). It pickles as it is, so it travels inside a Ray task's arguments."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __reduce__(self):
        return Secret, (self._value,)


@dataclass(frozen=True)
class EndpointSettings:
    """How url models are called: requests in flight, seconds per request, retries after the first try, and the
    environment variable holding an API key (sent as a bearer token). They change how fast answers come, never
    what they are: no field is part of a cache key.

    `api_key` reads the variable when asked, unless `with_key` has read it already (the settings then carry the
    key, unseen, to a process that lacks the variable: a Ray worker)."""

    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 4
    api_key_env: str | None = None
    backoff_s: float = 0.5  # the first retry's wait; doubled each time, at most 30 s
    key: Secret | None = field(default=None, repr=False, compare=False)

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.concurrency, int) or isinstance(self.concurrency, bool) or self.concurrency < 1:
            found.append(f"endpoint concurrency must be an integer >= 1, got {self.concurrency!r}")
        if isinstance(self.timeout_s, float) and math.isnan(self.timeout_s):
            found.append("endpoint timeout is NaN, not a number of seconds")
        elif not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s <= 3600:
            found.append(f"endpoint timeout must be in (0, 3600] seconds, got {self.timeout_s!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or not 0 <= self.retries <= 20:
            found.append(f"endpoint retries must be an integer in [0, 20], got {self.retries!r}")
        if self.api_key_env is not None and not self.api_key():
            found.append(f"API key variable {self.api_key_env} is not set")
        return found

    def api_key(self) -> str | None:
        if self.key is not None:
            return self.key.reveal()
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def with_key(self) -> EndpointSettings:
        """These settings carrying their API key, read from its variable now (as they are without a variable or
        with one that is not set)."""
        key = self.api_key()
        return replace(self, key=Secret(key)) if key else self


@dataclass(frozen=True)
class EndpointOverrides:
    """One url model's own endpoint settings (a models file's block): each field given replaces the command's."""

    concurrency: int | None = None
    timeout_s: float | None = None
    retries: int | None = None
    api_key_env: str | None = None

    def apply(self, settings: EndpointSettings) -> EndpointSettings:
        given: dict = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.api_key_env is not None:
            given["key"] = None  # a key the command's settings carry is not this variable's
        return replace(settings, **given)


@dataclass(frozen=True)
class ModelRef:
    """A named model: a local folder (optionally with a PEFT adapter folded on top) or a remote server's URL."""

    name: str
    path: Path | None = None
    _: KW_ONLY
    adapter: Path | None = None
    url: str | None = None  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    served_model: str | None = None  # the name the server knows the model by; None: `name`
    endpoint: EndpointOverrides | None = None  # this url model's own settings, over the command's

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
        if self.endpoint is not None and self.url is None:
            raise ModelRefError(f"model '{self.name}': endpoint settings apply to a url, not to a local folder")
        if self.url is not None:
            try:
                check_url(self.url)
            except AddressError as exc:
                raise ModelRefError(f"model '{self.name}': {exc}") from None

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    def endpoint_settings(self, command: EndpointSettings) -> EndpointSettings:
        """The settings this model is called with: the command's, with this model's own overrides on top."""
        return self.endpoint.apply(command) if self.endpoint is not None else command

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
                    raise ModelRefError(f"model reference {without_credentials(text)!r}: a remote model needs a name "
                                        "(NAME=URL)")
                url, served_model = _split_url(location)
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
            shown = without_credentials(text)  # a url's password is never repeated
            if repr(shown) in str(exc):
                raise
            raise ModelRefError(f"model reference {shown!r}: {exc}") from None

    def folder_problems(self) -> list[str]:
        """What is wrong with a local model's folders (none, or a url model): a missing folder, a folder that is
        not a model (no config.json) or not an adapter (no adapter_config.json)."""
        found = []
        if self.path is not None and not _is_dir(self.path):
            found.append(f"{self.path}: no such folder")
        elif self.path is not None and not (self.path / "config.json").is_file():
            found.append(f"{self.path} has no config.json (not a model folder)")
        if self.adapter is not None and not _is_dir(self.adapter):
            found.append(f"adapter {self.adapter}: no such folder")
        elif self.adapter is not None and not (self.adapter / "adapter_config.json").is_file():
            found.append(f"adapter {self.adapter} has no adapter_config.json")
        return found

    def resolve(self, folder: Path | None = None) -> ModelRef:
        """Relative paths found as mergekit finds them: in the working directory first, then in `folder` (a
        recipe's folder); `~` expanded. A path found in neither stays as written (its reader names it)."""
        if self.path is None:
            return self
        return replace(self, path=_find(self.path, folder),
                       adapter=_find(self.adapter, folder) if self.adapter is not None else None)

    def __str__(self) -> str:
        """The spelling `parse` reads back (without `endpoint`: only a models file spells those)."""
        if self.url is not None:
            return f"{self.name}={self.url}" + (f"#{self.served_model}" if self.served_model else "")
        return f"{self.name}={self.path}" + (f"+{self.adapter}" if self.adapter is not None else "")


def _is_url(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _REMOTE_SCHEMES


def _split_url(location: str) -> tuple[str, str | None]:
    """The base URL, checked (`addresses.check_url`), and the served model's name (the fragment)."""
    url, _, served_model = location.partition("#")
    try:
        check_url(url)
    except AddressError as exc:
        raise ModelRefError(str(exc)) from None
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


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ModelBlock(BaseModel):
    """One entry of a models file (its YAML schema): a local folder, or a server and its own endpoint settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = Field(default=None, min_length=1)
    adapter: str | None = Field(default=None, min_length=1)
    base_url: str | None = None  # checked by addresses.check_url; a '#NAME' after it names the served model
    model: str | None = Field(default=None, min_length=1)  # the name the server knows it by (default: the entry's)
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)  # the variable's name, never the key
    concurrency: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retries: int | None = Field(default=None, ge=0, le=20)

    @field_validator("base_url")
    @classmethod
    def _checked_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_url(value.partition("#")[0])  # AddressError is a ValueError: the field is named with it
        return value

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.base_url is None):
            raise ValueError("needs exactly one of 'path' or 'base_url'")
        if self.path is not None:
            remote_only = [name for name in ("model", "api_key_env", "concurrency", "timeout_s", "retries")
                           if getattr(self, name) is not None]
            if remote_only:
                raise ValueError(f"{', '.join(remote_only)} appl{'ies' if len(remote_only) == 1 else 'y'} to a "
                                 "'base_url', not to a local 'path'")
        elif self.adapter is not None:
            raise ValueError("an 'adapter' applies to a local 'path', not to a 'base_url'")
        return self

    def to_ref(self, name: str, folder: Path | None = None) -> ModelRef:
        """The entry as a ModelRef; relative paths found as `ModelRef.resolve` finds them (`folder`: the file's)."""
        if self.base_url is not None:
            url, served_model = _split_url(self.base_url)
            overrides = EndpointOverrides(self.concurrency, self.timeout_s, self.retries, self.api_key_env)
            return ModelRef(name, url=url, served_model=self.model or served_model,
                            endpoint=None if overrides == EndpointOverrides() else overrides)
        return ModelRef(name, Path(str(self.path)),
                        adapter=Path(self.adapter) if self.adapter is not None else None).resolve(folder)


def load_models_file(path: str | Path) -> dict[str, ModelRef]:
    """A models file (`models: {NAME: block}`, `ModelBlock`) as references by name, in the file's order.
    Every bad entry is reported at once, each naming the entry and its field (ModelRefError, one line per entry);
    a file refused so names its entries' missing folders too (a file that is not refused leaves those to the
    command that uses the entry: `evaluate.runner.check_models`)."""
    from ._yaml import read_yaml_file, require_mapping

    path = Path(path)
    where = f"models file {path}"
    data = require_mapping(read_yaml_file(path, where, ModelRefError), where, ModelRefError, "'models'")
    if set(data) != {"models"}:
        extra = sorted(map(str, set(data) - {"models"}))
        raise ModelRefError(f"{where}: " + (f"unknown field(s) {extra}; " if extra else "") +
                            "expected one field, 'models': a mapping of names to model blocks")
    entries = require_mapping(data["models"], f"{where}: models", ModelRefError, "names to model blocks")
    if not entries:
        raise ModelRefError(f"{where}: models: no models")
    refs: dict[str, ModelRef] = {}
    found: list[tuple[str, bool]] = []  # (a problem, whether the schema refuses it), in the file's order
    for name, block in entries.items():
        # a name that is not plain printable text is shown quoted, so it cannot break the one-line-per-entry form
        at = f"models.{name}" if isinstance(name, str) and name.isprintable() and name.strip() == name \
            else f"models[{name!r}]"
        if not isinstance(name, str):
            found.append((f"{at}: a name must be text, got {type(name).__name__}", True))
            continue
        try:
            refs[name] = ModelBlock.model_validate(block).to_ref(name, path.parent)
        except ValidationError as exc:
            found.append((f"{at}: {_entry_errors(exc)}", True))
        except ModelRefError as exc:
            found.append((f"{at}: {str(exc).removeprefix(f'model {name!r}: ')}", True))
        except RecursionError:
            found.append((f"{at}: nested too deeply", True))
        else:
            missing = refs[name].folder_problems()
            if missing:
                found.append((f"{at}: {'; '.join(missing)}", False))
    problems = [problem for problem, _ in found] if any(schema for _, schema in found) else []
    if len(problems) == 1:
        raise ModelRefError(f"{where}: {problems[0]}")
    if problems:
        raise ModelRefError(f"{where}: {len(problems)} bad entries:\n  " + "\n  ".join(problems))
    return refs


def _entry_errors(exc: ValidationError) -> str:
    from ._yaml import error_message, field_path

    parts = []
    for error in exc.errors():
        field, message = field_path(error), error_message(error)
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def resolve_model_ref(text: str, named: Mapping[str, ModelRef] | None = None) -> ModelRef:
    """`text` as a model: an entry of `named` (a models file's, `load_models_file`) when it is one of its names,
    else any spelling `ModelRef.parse` reads, with its paths resolved. Raises ModelRefError."""
    if named and isinstance(text, str) and text in named:
        return named[text]
    return ModelRef.parse(text).resolve()
