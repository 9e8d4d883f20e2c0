"""Recipes: mergekit's YAML schema, parsed with pydantic and checked against the method's declared parameters.

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layer's relative depth
t in [0, 1]) or a list of `{filter, value}` whose first matching filter (a substring of the tensor name;
`*` or no filter matches all) applies — exactly as mergekit evaluates them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator
from pydantic_core import ErrorDetails

from ._yaml import check_size, field_path, parse_yaml, read_yaml_file, require_mapping, validate
from .errors import RecipeError
from .io.dtypes import DTypeName, canonical_name
from .methods import MergeMethod, ParamSpec, get_method

Scalar = Union[bool, int, float, str]
MAX_PAD_TO_MULTIPLE_OF = 1 << 16  # padding rows are copies of the mean embedding; more than this is a typo


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None
    # data-aware methods: this model's own calibration JSONL (the data it was tuned for, as in RegMean's
    # setting), overriding the recipe's `calibration.path` for this model; a mergegate extension
    calibration: str | None = None


class InputSlice(BaseModel):
    """Layers [start, stop) of one model."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class OutputSlice(BaseModel):
    """Output layers merged from equally long input slices; stacked in order they make the output's depth."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None


class ModelToken(BaseModel):
    """A token's row taken from one model's row for some token (by string or id)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)


class ZeroRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Union[ModelToken, ZeroRow, str, None] = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's `tokenizer:` section: output vocabulary, per-token row sources, padding."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # "union" | "base" | a model reference
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=MAX_PAD_TO_MULTIPLE_OF)


class Calibration(BaseModel):
    """Calibration text for data-aware methods (fisher, regmean): a mergegate extension of mergekit's schema."""

    model_config = ConfigDict(extra="forbid")
    path: str  # JSONL rows with a "text" field (or "prompt" + "reference"), relative to the recipe like models
    max_rows: int = Field(default=64, ge=1, le=1 << 31)
    max_length: int = Field(default=128, ge=1, le=1 << 31)
    batch_size: int = Field(default=8, ge=1, le=1 << 31)


class Recipe(BaseModel):
    """A merge recipe. Field names and meanings are mergekit's."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] | None = None
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    slices: list[OutputSlice] | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    # mergekit keys that mergegate reads but does not support yet: named so the error can say so.
    modules: dict[str, Any] | None = None
    calibration: Calibration | None = None

    # not a recipe key: where the recipe was read from, given by the loader as the validation context
    # (`Recipe.model_validate(data, context={"folder": path})`)
    _folder: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_from(self, info: ValidationInfo) -> Recipe:
        folder = (info.context or {}).get("folder")
        self._folder = Path(folder) if folder is not None else None
        return self

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def folder(self) -> Path | None:
        """The folder of the recipe file, used to resolve relative model paths that are not relative to cwd."""
        return self._folder

    def model_refs(self) -> list[str]:
        """Every referenced model, base first, in recipe order, without repeats."""
        refs = [self.base_model] if self.base_model else []
        listed = [entry.model for entry in self.models or []]
        for piece in self.slices or []:
            listed += ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]
        for ref in listed:
            if ref not in refs:
                refs.append(ref)
        return refs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def load_recipe(source: str | Path | dict | Recipe, *, folder: str | Path | None = None) -> Recipe:
    """Parse and validate a recipe from a YAML file, a YAML string, or a dict.

    `folder`: where relative model and calibration paths are also looked for (after the working directory) —
    for a file, its own folder unless given; a Recipe is returned as it is, with the folder it was made with.

    Anything wrong — a file that is not UTF-8, YAML that does not parse or uses python/unsafe tags, a
    document that is not a mapping, a bad key or value — raises RecipeError naming the file and field.
    """
    if isinstance(source, Recipe):
        return source
    where = "recipe"
    if isinstance(source, dict):
        data = source
    elif isinstance(source, (str, Path)):
        path = _recipe_path(source)
        if path is None:
            data = parse_yaml(str(source), where, RecipeError)
        else:
            _check_recipe_file(path)
            data, where = read_yaml_file(path, str(path), RecipeError), str(path)
            folder = path.resolve().parent if folder is None else folder
    else:
        raise RecipeError(f"recipe: expected a YAML file, YAML text or a mapping, got {type(source).__name__}")
    data = dict(require_mapping(data, where, RecipeError, "recipe keys"))
    check_size(data, where, RecipeError)  # a mapping given directly (parsed documents are checked already)
    for key in ("dtype", "out_dtype"):
        if key in data:
            data[key] = canonical_name(data[key])
    recipe = validate(Recipe, data, where, RecipeError, message=_recipe_message, context={"folder": folder})
    _check(recipe, where)
    return recipe


def _recipe_path(source: str | Path) -> Path | None:
    """The file `source` names, or None when it is YAML text: a Path, or a one-line string naming a
    .yaml/.yml file or an existing path, is a file."""
    text = str(source)
    if "\x00" in text:
        if isinstance(source, Path):
            raise RecipeError(f"recipe {text!r}: a file name cannot contain a NUL character")
        return None  # not a usable path: YAML text (where a NUL is refused by the parser)
    if isinstance(source, Path):
        return source
    if "\n" in text:
        return None
    path = Path(text)
    try:
        is_path = path.suffix in {".yaml", ".yml"} or path.exists()
    except (OSError, ValueError):  # a name too long for the file system, ...
        is_path = False
    return path if is_path else None


def _check_recipe_file(path: Path) -> None:
    """A recipe path names an existing file (its errors say "recipe PATH", content errors just "PATH")."""
    try:
        found = path.is_file()
    except OSError as exc:
        raise RecipeError(f"recipe {path}: cannot be read ({exc.strerror or exc})") from None
    if not found:
        raise RecipeError(f"recipe {path}: no such file")


def _recipe_message(error: ErrorDetails) -> str | None:
    """Recipe errors worded for mergekit users: unknown keys list the allowed ones, literals say what was given."""
    if error["type"] == "extra_forbidden":
        owners: dict[str, type[BaseModel]] = {"models": ModelEntry, "parameters": Conditional,
                                              "calibration": Calibration, "slices": OutputSlice,
                                              "tokenizer": TokenizerSection}
        owner = owners.get(str(error["loc"][0]), Recipe)
        return f"unknown key '{field_path(error)}' (allowed: {', '.join(owner.model_fields)})"
    if error["type"] == "literal_error":
        return f"{error['msg']}, got {error['input']!r}"
    return None


def _check(recipe: Recipe, where: str) -> None:
    if recipe.modules is not None:
        raise RecipeError(f"{where}: 'modules' (multi-module merges) is not supported by this version of mergegate")
    if bool(recipe.models) == bool(recipe.slices):
        raise RecipeError(f"{where}: give exactly one of 'models' (a list of models) or 'slices' (layer ranges)")
    paths = [("model", ref) for ref in recipe.model_refs()]
    paths += [("calibration", entry.calibration) for entry in recipe.models or [] if entry.calibration]
    paths += [("calibration.path", recipe.calibration.path)] if recipe.calibration else []
    for field, path in paths:
        if not path.strip() or "\x00" in path:
            raise RecipeError(f"{where}: {field} {path!r} is not a usable path (empty, or holds a NUL character)")
    if recipe.tokenizer_source and recipe.tokenizer:
        raise RecipeError(f"{where}: give 'tokenizer_source' or a 'tokenizer' section, not both")
    for key, value in (("tokenizer_source", recipe.tokenizer_source),
                       ("tokenizer.source", recipe.tokenizer.source if recipe.tokenizer else None)):
        if value not in (None, "base", "union") and value not in recipe.model_refs():
            raise RecipeError(
                f"{where}: {key} must be 'base', 'union' or one of the recipe's models, got {value!r}"
            )
    for token, token_setting in ((recipe.tokenizer.tokens or {}) if recipe.tokenizer else {}).items():
        row_source = token_setting.source
        if isinstance(row_source, ModelToken) and (row_source.token is None) == (row_source.token_id is None):
            raise RecipeError(f"{where}: tokenizer.tokens[{token!r}].source: give exactly one of token or token_id")
    method = recipe.method
    own_calibration = any(entry.calibration for entry in recipe.models or [])
    if (recipe.calibration is not None or own_calibration) and method.statistics is None:
        raise RecipeError(f"{where}: 'calibration' is only read by data-aware methods (fisher, regmean), "
                          f"not by {method.name}")
    known = {p.name: p for p in method.shared_params + method.per_model_params}
    per_model = {p.name: p for p in method.per_model_params}
    for key, setting in (recipe.parameters or {}).items():
        _check_setting(known, key, setting, f"{where}: parameters.{key}", method)
    if recipe.slices:
        for i, piece in enumerate(recipe.slices):
            here = f"{where}: slices[{i}]"
            if not piece.sources:
                raise RecipeError(f"{here}: 'sources' must list at least one layer range")
            for j, source in enumerate(piece.sources):
                start, stop = source.layer_range
                if not 0 <= start < stop:
                    raise RecipeError(f"{here}.sources[{j}].layer_range: need 0 <= start < stop, got {[start, stop]}")
                for key, setting in (source.parameters or {}).items():
                    _check_setting(per_model, key, setting, f"{here}.sources[{j}].parameters.{key}", method)
            spans = {s.layer_range[1] - s.layer_range[0] for s in piece.sources}
            if len(spans) > 1:
                raise RecipeError(f"{here}: every source must span the same number of layers, got "
                                  + ", ".join(f"{s.model} {list(s.layer_range)}" for s in piece.sources))
            for key, setting in (piece.parameters or {}).items():
                _check_setting(known, key, setting, f"{here}.parameters.{key}", method)
            base = piece.base_model or recipe.base_model
            _check_counts(method, [s.model for s in piece.sources], base, here)
        return
    listed = [e.model for e in recipe.models or []]
    for i, ref in enumerate(listed):
        if ref in listed[:i]:
            raise RecipeError(f"{where}: models[{i}]: '{ref}' is listed twice (mergekit refuses duplicate inputs)")
    _check_counts(method, listed, recipe.base_model, where, base_joins=True)
    if method.base == "ignored" and recipe.base_model and recipe.base_model not in listed:
        for spec in method.per_model_params:
            if spec.required and spec.name not in (recipe.parameters or {}):
                raise RecipeError(
                    f"{where}: models: base_model '{recipe.base_model}' is not listed, so it is merged as one more "
                    f"input (as mergekit does) and needs parameter '{spec.name}': list it under models with a "
                    f"{spec.name} (0 leaves it out), set parameters.{spec.name}, or drop base_model")
    for i, entry in enumerate(recipe.models or []):
        for key, setting in (entry.parameters or {}).items():
            _check_setting(per_model, key, setting, f"{where}: models[{i}].parameters.{key}", method)


def _check_counts(method: MergeMethod, models: list[str], base: str | None, where: str,
                  base_joins: bool = False) -> None:
    """`base_joins`: a `models:` recipe, where mergekit makes base_model an input of every method when the
    list lacks it (for the methods that ignore a base, an input like the others; see `input_models`)."""
    if method.base == "required" and not base:
        raise RecipeError(f"{where}: merge_method {method.name} needs base_model")
    if method.base == "ignored":
        others = input_models(models, base) if base_joins else list(models)
    else:
        others = [m for m in dict.fromkeys(models) if m != base]
    if len(others) < method.min_models or (method.max_models is not None and len(others) > method.max_models):
        wanted = f"exactly {method.min_models}" if method.min_models == method.max_models else (
            f"at least {method.min_models}" if method.max_models is None else
            f"{method.min_models} to {method.max_models}")
        role = "models" if method.base == "ignored" else "models besides base_model"
        added = (f" (base_model '{base}' is one of them: mergekit adds it to the inputs when 'models' does not "
                 f"list it)") if method.base == "ignored" and base_joins and base and base not in models else ""
        raise RecipeError(f"{where}: {method.name} takes {wanted} {role}, got {len(others)}: {others}{added}")


def input_models(models: list[str], base: str | None) -> list[str]:
    """The inputs of a `models:` recipe as mergekit 0.1.5 builds them: the listed models in order, then
    base_model when it is set and not listed — for every method, including those that ignore a base
    (linear, karcher, passthrough, ...), where it is then merged like any other input."""
    return list(models) + ([base] if base and base not in models else [])


def _check_setting(known: dict[str, ParamSpec], key: str, setting: Setting, where: str, method: MergeMethod):
    if key not in known:
        allowed = ", ".join(known) or "none"
        raise RecipeError(f"{where}: unknown parameter '{key}' for {method.name} (allowed here: {allowed})")
    spec = known[key]
    for leaf in _leaves(setting):
        spec.coerce(leaf, where)


def _leaves(setting: Setting):
    if isinstance(setting, Conditional):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def evaluate(setting: Setting, spec: ParamSpec, tensor_name: str, t: float, where: str) -> Any:
    """The value of `setting` for one tensor at relative depth `t`; None when no filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return spec.coerce(setting, where)
    if not setting:
        return None
    conditions = [item for item in setting if isinstance(item, Conditional)]
    if len(conditions) == len(setting):
        for cond in conditions:
            pattern = cond.filter
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return evaluate(cond.value, spec, tensor_name, t, where)
        return None
    values = [spec.coerce(item, where) for item in setting]
    if spec.kind is bool:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(math.floor(scaled))
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return spec.coerce((1 - frac) * values[low] + frac * values[high], where)
