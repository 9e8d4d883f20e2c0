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
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from .errors import RecipeError
from .methods import MergeMethod, ParamSpec, get_method

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]
DType = Literal["float32", "float16", "bfloat16", "float64"]
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None


class Calibration(BaseModel):
    """Calibration text for data-aware methods (fisher, regmean): a mergegate extension of mergekit's schema."""

    model_config = ConfigDict(extra="forbid")
    path: str  # JSONL rows with a "text" field (or "prompt" + "reference"), relative to the recipe like models
    max_rows: int = 64
    max_length: int = 128
    batch_size: int = 8


class Recipe(BaseModel):
    """A merge recipe. Field names and meanings are mergekit's."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] | None = None
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    # mergekit keys that mergegate reads but does not support yet: named so the error can say so.
    slices: list[Any] | None = None
    modules: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    calibration: Calibration | None = None

    _folder: Path | None = PrivateAttr(default=None)

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
        for entry in self.models or []:
            if entry.model not in refs:
                refs.append(entry.model)
        return refs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """Parse and validate a recipe from a YAML file, a YAML string, or a dict."""
    if isinstance(source, Recipe):
        return source
    folder = None
    where = "recipe"
    if isinstance(source, dict):
        data = source
    else:
        text = str(source)
        path = Path(text) if isinstance(source, Path) or "\n" not in text else None
        if path is not None and (path.suffix in {".yaml", ".yml"} or path.exists()):
            if not path.is_file():
                raise RecipeError(f"recipe {path}: no such file")
            text = path.read_text()
            folder, where = path.resolve().parent, str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of recipe keys, got {type(data).__name__}")
    data = dict(data)
    for key in ("dtype", "out_dtype"):
        if isinstance(data.get(key), str):
            data[key] = _DTYPE_ALIASES.get(data[key], data[key])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where}: " + _explain(exc)) from None
    recipe._folder = folder
    _check(recipe, where)
    return recipe


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith(("function-", "union[")))
        if err["type"] == "extra_forbidden":
            owner = {"models": ModelEntry, "parameters": Conditional, "calibration": Calibration}.get(str(err["loc"][0]), Recipe)
            allowed = ", ".join(owner.model_fields)
            lines.append(f"unknown key '{loc}' (allowed: {allowed})")
        elif err["type"] == "literal_error":
            lines.append(f"{loc}: {err['msg']}, got {err['input']!r}")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def _check(recipe: Recipe, where: str) -> None:
    for key, later in (("slices", "passthrough and depth up-scaling"), ("modules", "multi-module merges"),
                       ("tokenizer", "vocabulary merging"), ("chat_template", "chat template selection")):
        if getattr(recipe, key) is not None:
            raise RecipeError(f"{where}: '{key}' ({later}) is not supported by this version of mergegate")
    if not recipe.models:
        raise RecipeError(f"{where}: 'models' must list at least one model")
    if recipe.tokenizer_source not in (None, "base") and recipe.tokenizer_source not in recipe.model_refs():
        raise RecipeError(
            f"{where}: tokenizer_source must be 'base' or one of the recipe's models, got {recipe.tokenizer_source!r}"
        )
    method = recipe.method
    if method.base == "required" and not recipe.base_model:
        raise RecipeError(f"{where}: merge_method {method.name} needs base_model")
    others = [m for m in recipe.model_refs() if m != recipe.base_model or method.base == "ignored"]
    if method.base == "ignored":
        others = [e.model for e in recipe.models]
    if len(others) < method.min_models or (method.max_models is not None and len(others) > method.max_models):
        wanted = f"exactly {method.min_models}" if method.min_models == method.max_models else (
            f"at least {method.min_models}" if method.max_models is None else
            f"{method.min_models} to {method.max_models}")
        role = "models" if method.base == "ignored" else "models besides base_model"
        raise RecipeError(f"{where}: {method.name} takes {wanted} {role}, got {len(others)}: {others}")

    known = {p.name: p for p in method.shared_params + method.per_model_params}
    for key, setting in (recipe.parameters or {}).items():
        _check_setting(known, key, setting, f"{where}: parameters.{key}", method)
    per_model = {p.name: p for p in method.per_model_params}
    for i, entry in enumerate(recipe.models):
        for key, setting in (entry.parameters or {}).items():
            _check_setting(per_model, key, setting, f"{where}: models[{i}].parameters.{key}", method)


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
    if all(isinstance(item, Conditional) for item in setting):
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
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
