"""The method registry: a merge method is a pure function over tensors plus typed parameters.

A method declares two frozen dataclasses: `Shared` (one value per tensor, e.g. `normalize`, `t`) and
`PerModel` (one value per input model, e.g. `weight`, `density`). Their fields *are* the recipe's
parameter names and defaults, so the recipe validator, the planner and the docs all read the same
declaration. A field without a default is required, as in mergekit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from ..errors import RecipeError

BaseRule = Literal["required", "ignored", "optional"]
PerModelScope = Literal["input", "non_base"]
StatisticKind = Literal["fisher", "gram"]  # calibration statistics (calibration.py computes them)


@dataclass(frozen=True)
class NoParams:
    """For methods without parameters of this kind."""


FLOAT32_MAX = 3.4028234663852886e38  # methods compute in float32: a parameter beyond it cannot even be applied


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter as a method declares it."""

    name: str  # the recipe's spelling (`lambda`, not `lambda_`)
    field: str  # the dataclass field
    kind: type  # float, bool or int
    default: Any  # dataclasses.MISSING when required
    low: float | None = None
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def coerce(self, value: Any, where: str) -> Any:
        """Validate one scalar the way mergekit does: numbers for floats (YAML '1e-3' strings too), real bools,
        whole numbers for ints. Every number must also be finite and inside the declared range: a NaN or an
        infinite weight would turn every output tensor into NaN."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise RecipeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            raise RecipeError(f"{where}: parameter '{self.name}' is too large ({len(str(value))} digits)") from None
        except ValueError:
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}") from None
        if not math.isfinite(number):
            shown = value if isinstance(value, str) else repr(number)
            raise RecipeError(f"{where}: {shown} is not a finite number")
        if abs(number) > FLOAT32_MAX:
            raise RecipeError(f"{where}: parameter '{self.name}' is too large for float32 arithmetic, got {value!r}")
        if self.kind is int:
            if not number.is_integer():
                raise RecipeError(f"{where}: parameter '{self.name}' must be a whole number, got {value!r}")
            number = int(value) if isinstance(value, int) else int(number)
            if abs(number) >= 1 << 63:
                raise RecipeError(f"{where}: parameter '{self.name}' is too large, got {number}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise RecipeError(f"{where}: parameter '{self.name}' must be within {self.range_text()}, got {number!r}")
        return number

    def range_text(self) -> str:
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"[{low}, {high}]"


def param(default: Any = dataclasses.MISSING, *, name: str | None = None, low=None, high=None) -> Any:
    """A dataclass field that is a recipe parameter; `name` overrides the spelling (for `lambda`).

    `low` and `high` bound the values a recipe may give (inclusive; None: unbounded). Numbers are always
    required to be finite, so declare only what the method's definition adds (a density in [0, 1])."""
    meta = {"recipe_name": name, "low": low, "high": high}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _specs(cls: type) -> tuple[ParamSpec, ...]:
    hints = {"float": float, "bool": bool, "int": int}
    specs = []
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else hints[str(f.type)]
        specs.append(
            ParamSpec(
                name=f.metadata.get("recipe_name") or f.name,
                field=f.name,
                kind=kind,
                default=f.default,
                low=f.metadata.get("low"),
                high=f.metadata.get("high"),
            )
        )
    return tuple(specs)


MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. `fn(base, tensors, per_model, shared, rng) -> Tensor`.

    `base` is the base model's tensor in the compute dtype (None when the method ignores it); `tensors` are
    the other inputs in recipe order, in their stored floating dtype — methods compute in float32 or wider
    (`work_dtype`) and must not modify their inputs; `per_model[i]` are the typed parameters of `tensors[i]`; `rng` is a generator seeded
    per tensor, so random methods give the same bytes whatever order tensors are computed in.
    """

    name: str
    fn: MethodFn
    shared: type
    per_model: type
    base: BaseRule
    per_model_scope: PerModelScope
    min_models: int
    max_models: int | None
    random: bool
    elementwise: bool  # each output element depends only on the same element of the inputs
    summary: str
    statistics: StatisticKind | None = None  # calibration statistics the method reads (see calibration.py)

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return _specs(self.shared)

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return _specs(self.per_model)

    def param_names(self) -> list[str]:
        return [p.name for p in self.shared_params + self.per_model_params]

    def __call__(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        per_model: Sequence[Any],
        shared: Any,
        rng: torch.Generator | None = None,
        stats: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """`stats`, for methods declared with `statistics`, holds one calibration statistic per entry of
        `tensors` (None where that input has none for this tensor); other methods take none."""
        inputs = ([base] if base is not None else []) + list(tensors)
        for position, tensor in enumerate(inputs):
            if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteInput(position - (base is not None))
        if self.statistics is None:
            if stats is not None:
                raise TypeError(f"merge method {self.name} takes no calibration statistics")
            return self.fn(base, list(tensors), list(per_model), shared, rng)
        if stats is not None:
            stats = list(stats)
            if len(stats) != len(tensors):
                raise ValueError(f"{len(stats)} calibration statistics for {len(tensors)} inputs")
            for position, stat in enumerate(stats):
                if stat is not None and not bool(torch.isfinite(stat).all()):
                    raise ValueError(f"the {self.statistics} statistics of input {position} hold NaN or infinite "
                                     "values")
        return self.fn(base, list(tensors), list(per_model), shared, rng, stats=stats)


CHUNK_ELEMENTS = 1 << 22  # work on large tensors in row chunks of about this many elements


def row_spans(shape: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of about `chunk_elements` each; a single span covering everything when the
    tensor is small, 0-d or one row (then there is nothing to gain from chunking)."""
    rows = shape[0] if len(shape) else 1
    numel = 1
    for size in shape:
        numel *= size
    if len(shape) < 1 or numel <= chunk_elements or rows < 2:
        return [(0, rows)]
    step = max(1, chunk_elements // max(1, numel // rows))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit inputs, float64 for float64: what methods compute in."""
    return torch.promote_types(tensor.dtype, torch.float32)


class NonFiniteInput(ValueError):
    """An input holds NaN or infinity. `index` is its position in `tensors`; -1 is the base."""

    def __init__(self, index: int):
        self.index = index
        super().__init__(f"input {'base' if index < 0 else index} holds NaN or infinite values")


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    shared: type = NoParams,
    per_model: type = NoParams,
    base: BaseRule = "required",
    per_model_scope: PerModelScope = "non_base",
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    elementwise: bool = False,
    statistics: StatisticKind | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` under `name`. Counts are of models other than the base (all models when base is ignored).

    `elementwise` methods may be given any slice of a tensor: the engine then splits large tensors into
    row chunks, which bounds memory and spreads one big tensor over every worker.
    `statistics` methods are data-aware: the planner computes that statistic for each input model from
    the recipe's calibration text, and `fn` receives them as the keyword `stats`.
    """

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = MergeMethod(
            name, fn, shared, per_model, base, per_model_scope, min_models, max_models, random, elementwise, summary,
            statistics,
        )
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"merge_method: unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
