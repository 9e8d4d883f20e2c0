"""A search space: a mergekit recipe in which some values are ranges or choices.

Anywhere a recipe holds a value, a mapping with `range` or `choice` makes it a searched value:

- `{range: [LOW, HIGH]}` — a float drawn in [LOW, HIGH] (`log: true` for a log scale, `step: S` for a grid);
  both ends whole numbers and `int: true` draw an integer;
- `{choice: [A, B, ...]}` — one of the listed values (the merge method, a dtype, a flag, a number);
- `groups: N` beside a range — a per-layer gradient: N values drawn independently, written as mergekit's
  gradient list `[v1, ..., vN]` (interpolated over depth), so each depth group gets its own coefficient.

A recipe without any such mapping is a valid space of one point. Searched method parameters are conditional on
the method: a point keeps only the parameters its merge method declares (so `density` is drawn only when the
drawn method has one), and a parameter no method in the space declares is refused when the space is loaded, as is
a space that can draw a combination its method refuses (della's density with epsilon: checked at the ranges' edges).

Each searched value has a name, its path in the recipe (`merge_method`, `parameters.lambda`,
`models[1].parameters.weight`, with `[g]` per gradient group): Optuna's parameter names, the report's columns.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._yaml import parse_yaml, read_yaml_file, require_mapping
from ..errors import RecipeError, SearchSpaceError
from ..methods import MergeMethod, ParamSpec, available_methods, get_method
from ..recipe import Recipe, load_recipe

_NODE_KEYS = {"range", "choice", "log", "step", "int", "groups"}
_CONDITIONAL_KEYS = {"filter", "value"}  # mergekit's conditional parameter value: {filter: ..., value: ...}
MAX_GROUPS = 16  # more depth groups than this is a typo, not a gradient


class Suggest(Protocol):
    """What a space needs from an optimiser's trial (Optuna's `Trial` has exactly these)."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Searched:
    """One searched value: where it sits in the recipe and how it is drawn."""

    path: tuple[str | int, ...]  # keys and list indexes from the recipe's root
    name: str
    choice: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    groups: int | None = None  # a gradient: this many values, each drawn on its own

    def draw(self, trial: Suggest) -> Any:
        if self.choice is not None:
            return trial.suggest_categorical(self.name, list(self.choice))
        if self.groups is not None:
            return [self._one(trial, f"{self.name}[{g}]") for g in range(self.groups)]
        return self._one(trial, self.name)

    def _one(self, trial: Suggest, name: str) -> float | int:
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class Space:
    """A loaded space: the recipe template, its searched values, and the folder relative paths start from."""

    template: dict[str, Any]
    searched: tuple[Searched, ...]
    folder: Path | None
    sha256: str  # of the template and searched values: a resumed search must search the same space
    declared: frozenset[str] = frozenset()  # every parameter some method of the space declares

    @property
    def methods(self) -> list[str]:
        node = next((s for s in self.searched if s.path == ("merge_method",)), None)
        return [str(m) for m in node.choice] if node is not None and node.choice else [self.template["merge_method"]]

    def point(self, trial: Suggest) -> Recipe:
        """Draw one recipe: the method first, then only the parameters that method declares (conditional)."""
        values: dict[tuple[str | int, ...], Any] = {}
        method_node = next((s for s in self.searched if s.path == ("merge_method",)), None)
        if method_node is not None:
            values[method_node.path] = method_node.draw(trial)
        method = get_method(str(values.get(("merge_method",), self.template["merge_method"])))
        known = set(method.param_names())
        for node in self.searched:
            if node is method_node:
                continue
            if _parameter_name(node.path) not in (None, *known):
                continue  # this method has no such parameter: not drawn, and dropped below
            values[node.path] = node.draw(trial)
        return self.recipe(values, method.name, known)

    def recipe(self, values: dict[tuple[str | int, ...], Any], method: str, known: set[str]) -> Recipe:
        data = copy.deepcopy(self.template)
        for path, value in values.items():
            _set(data, path, value)
        data["merge_method"] = method
        # Parameters of the space's other methods are conditional: dropped when this method lacks them. Any other
        # unknown one stays, so the recipe check names it.
        _drop_parameters(data, self.declared - known)
        try:
            return load_recipe(data, folder=self.folder)
        except RecipeError as exc:
            raise SearchSpaceError(f"search space: a drawn point is not a valid recipe: {exc}") from None

    def fixed_point(self) -> Recipe:
        """The recipe with every searched value at its first choice or its range's low end (the space's models,
        method and shape, e.g. to evaluate the sources before any trial)."""
        return self.point(_FirstValues())


class _FirstValues:
    def suggest_float(self, name, low, high, *, step=None, log=False):
        return low

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return low

    def suggest_categorical(self, name, choices):
        return choices[0]


def load_space(source: str | Path | dict) -> Space:
    """Parse a space from a YAML file, YAML text or a mapping; every searched value is checked and every bad one
    reported at once (SearchSpaceError naming its path). The template, with each searched value at its first
    point, must be a valid recipe for each method in the space."""
    folder = None
    where = "search space"
    if isinstance(source, dict):
        data = source
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and Path(source).is_file()):
        path = Path(source)
        data, folder, where = read_yaml_file(path, str(path), SearchSpaceError), path.resolve().parent, str(path)
    elif isinstance(source, str):
        data = parse_yaml(source, where, SearchSpaceError)
    else:
        raise SearchSpaceError(f"search space: expected a YAML file, YAML text or a mapping, got "
                               f"{type(source).__name__}")
    data = dict(require_mapping(data, where, SearchSpaceError, "recipe keys"))
    problems: list[str] = []
    searched: list[Searched] = []
    template = _collect(data, (), searched, problems)
    methods = next((list(s.choice or ()) for s in searched if s.path == ("merge_method",)), None)
    if methods is None and not isinstance(template.get("merge_method"), str):
        problems.append("merge_method: a method name or {choice: [...]} of method names is required")
    for name in methods or []:
        if name not in available_methods():
            problems.append(f"merge_method: unknown method {name!r} in choice")
    for node in searched:
        if node.path != ("merge_method",) and node.path[0] == "merge_method":
            problems.append(f"{node.name}: only the whole merge_method can be searched")
        if node.path and node.path[0] in ("models", "slices") and node.path[-1] == "model":
            problems.append(f"{node.name}: the models are the space's fixed inputs; search their parameters")
    if problems:
        raise SearchSpaceError(f"{where}: " + "; ".join(problems))
    methods = methods or [template["merge_method"]]
    declared = set().union(*(get_method(name).param_names() for name in methods))
    unknown = sorted({name for node in searched if (name := _parameter_name(node.path)) and name not in declared})
    if unknown:
        raise SearchSpaceError(f"{where}: parameter(s) {', '.join(unknown)} are declared by no method in the space "
                               f"({', '.join(methods)})")
    digest = hashlib.sha256(json.dumps([template, [_describe(s) for s in searched]], sort_keys=True,
                                       default=str).encode()).hexdigest()
    space = Space(template, tuple(searched), folder, digest, frozenset(declared))
    _check_points(space, methods, where)
    return space


def _check_points(space: Space, methods: list[str], where: str) -> None:
    """Every value a trial can draw at the edges — each choice, each range's ends — must make a recipe with each
    method of the space (the rest at their first values), and every combination of the edges must pass the
    method's own rules over several parameters together: a typo, an out-of-range bound or a window no merge
    accepts shows now, once, not in trial 37."""
    first = _FirstValues()
    fixed = {node.path: node.draw(first) for node in space.searched if node.path != ("merge_method",)}
    for name in methods:  # the template itself: one message, not one per edge that repeats it
        try:
            space.recipe(fixed, name, set(get_method(name).param_names()))
        except SearchSpaceError as exc:
            raise SearchSpaceError(f"{where}: with merge_method {name} and its first values: "
                                   f"{_reason(exc)}") from None
    problems: dict[str, str] = {}  # each reason once, with the first point that showed it
    for name in methods:
        known = set(get_method(name).param_names())
        for edge in space.searched:
            if edge.path == ("merge_method",) or _parameter_name(edge.path) not in (None, *known):
                continue
            for value in _edges(edge):
                try:
                    space.recipe({**fixed, edge.path: value}, name, known)
                except SearchSpaceError as exc:
                    problems.setdefault(_reason(exc), f"with merge_method {name} and {edge.name} = {value!r}")
        for scope, reason in _joint_problems(space, get_method(name)):
            problems.setdefault(reason, f"with merge_method {name}, {scope} can draw a point the method refuses")
    if problems:
        raise SearchSpaceError(f"{where}: " + "; ".join(f"{shown}: {reason}" for reason, shown in problems.items()))


def _reason(exc: SearchSpaceError) -> str:
    """A drawn point's refusal without its "search space: a drawn point is not a valid recipe" lead."""
    return str(exc).split(": ", 2)[-1]


MAX_COMBINATIONS = 4096  # combinations tried per parameter set (beyond it, only the ranges' ends, or none)


def _joint_problems(space: Space, method: MergeMethod) -> list[tuple[str, str]]:
    """Where the method's own check over several parameters together (della's density with epsilon: its
    parameter classes' `__post_init__`, run when a merge resolves a tensor's parameters) refuses a combination a
    trial can draw. Tried on the values at each parameter's edges — each range's ends and the values just inside
    them (a rule may spare an end itself: della's density 1), each choice, each fixed value, else the default —
    combined, for each model's parameters and for the shared ones."""
    nodes = {node.path: node for node in space.searched}
    found = []
    for cls, specs, where, scopes in _parameter_sets(space.template, method):
        if not hasattr(cls, "__post_init__"):
            continue  # no rule over several parameters: each one was checked on its own
        candidates = []
        for spec in specs:
            values = _setting_values(space.template, scopes, spec, nodes)
            if values is None:
                break  # a required parameter with no value: the recipe check names it
            candidates.append(values)
        else:
            reason = _first_refusal(cls, specs, candidates, where)
            if reason is not None:
                found.append((where, reason))
    return found


def _first_refusal(cls: type, specs: tuple[ParamSpec, ...], candidates: list[tuple[list, list]],
                   where: str) -> str | None:
    """The method's refusal of the first combination it refuses: the ends alone first, then with the values just
    inside them."""
    for pick in (0, 1):
        pools = [ends if pick == 0 else ends + inside for ends, inside in candidates]
        if math.prod(len(pool) for pool in pools) > MAX_COMBINATIONS:
            return None
        for combination in itertools.product(*pools):
            try:
                values = {spec.field: spec.coerce(value, where) for spec, value in zip(specs, combination)}
            except RecipeError:
                continue  # a value out of its own range: the edge check names it
            try:
                cls(**values)
            except (RecipeError, ValueError) as exc:
                return str(exc)
    return None


def _parameter_sets(template: dict, method: MergeMethod) -> Iterator[tuple[type, tuple[ParamSpec, ...], str,
                                                                           list[tuple[str | int, ...]]]]:
    """Each set of parameters a merge resolves together, as (class, specs, where, the `parameters` mappings it
    reads, first match wins): the shared ones, and each model's (its own over its slice's over the recipe's)."""
    top: tuple[str | int, ...] = ("parameters",)
    slices = template.get("slices")
    if isinstance(slices, list):
        for i, piece in enumerate(slices):
            here: tuple[str | int, ...] = ("slices", i, "parameters")
            yield method.shared, method.shared_params, f"slices[{i}]", [here, top]
            sources = piece.get("sources") if isinstance(piece, dict) else None
            for j, _ in enumerate(sources if isinstance(sources, list) else []):
                yield (method.per_model, method.per_model_params, f"slices[{i}].sources[{j}]",
                       [("slices", i, "sources", j, "parameters"), here, top])
        return
    yield method.shared, method.shared_params, "parameters", [top]
    models = template.get("models")
    for i, _ in enumerate(models if isinstance(models, list) else []):
        yield method.per_model, method.per_model_params, f"models[{i}]", [("models", i, "parameters"), top]


def _setting_values(template: dict, scopes: list[tuple[str | int, ...]], spec: ParamSpec,
                    nodes: dict[tuple[str | int, ...], Searched]) -> tuple[list, list] | None:
    """The values a parameter can take, as (ends, just inside the ends), from the first scope that sets it; its
    default where none does; None when it is required and unset."""
    for scope in scopes:
        mapping = _get(template, scope)
        if isinstance(mapping, dict) and spec.name in mapping:
            ends: list = []
            inside: list = []
            _collect_values(mapping[spec.name], (*scope, spec.name), nodes, ends, inside)
            return ends, inside
    return None if spec.required else ([spec.default], [])


def _collect_values(value: Any, path: tuple[str | int, ...], nodes: dict[tuple[str | int, ...], Searched],
                    ends: list, inside: list) -> None:
    """The searched values' probes and the fixed leaves in a parameter's setting (a gradient, a conditional)."""
    if path in nodes:
        node_ends, node_inside = _probes(nodes[path])
        ends += node_ends
        inside += node_inside
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _collect_values(item, (*path, i), nodes, ends, inside)
    elif isinstance(value, dict):
        _collect_values(value.get("value"), (*path, "value"), nodes, ends, inside)
    elif value is not None:
        ends.append(value)


def _probes(node: Searched) -> tuple[list, list]:
    """A searched value's ends and the values a draw can take just inside them."""
    if node.choice is not None:
        return list(node.choice), []
    assert node.low is not None and node.high is not None
    low, high = node.low, node.high
    if node.integer or node.step is not None:  # a grid: its first and last points, and their neighbours
        step = node.step or 1
        top = low + math.floor((high - low) / step) * step
        return [low, top], [value for value in (low + step, top - step) if low < value < top]
    return [low, high], [math.nextafter(low, high), math.nextafter(high, low)]


def _get(data: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return None
        elif not isinstance(data, dict):
            return None
        data = data[part] if isinstance(part, int) else data.get(part)
    return data


def _edges(node: Searched) -> list[Any]:
    """The values at the edges of what `node` can draw: each choice, or the range's two ends."""
    if node.choice is not None:
        return list(node.choice)
    return [[end] * node.groups if node.groups else end for end in (node.low, node.high)]


def _describe(node: Searched) -> dict[str, Any]:
    return {k: v for k, v in node.__dict__.items() if v is not None and k != "name"}


def _name(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _parameter_name(path: tuple[str | int, ...]) -> str | None:
    """The method parameter a path sets (`parameters.<name>` anywhere), or None for a recipe field."""
    keys = [p for p in path if isinstance(p, str)]
    if "parameters" in keys:
        after = keys[keys.index("parameters") + 1:]
        return after[0] if after else None
    return None


def _is_node(value: Any, path: tuple[str | int, ...]) -> bool:
    """A searched value: a mapping with one of the node keys, or any mapping where a method parameter's value
    sits other than mergekit's conditional `{filter, value}` (a misspelt `rnage` is named, not read as a value)."""
    if not isinstance(value, dict):
        return False
    keys = set(map(str, value))
    return bool(keys & _NODE_KEYS) or (_parameter_name(path) is not None and not keys <= _CONDITIONAL_KEYS)


def _collect(value: Any, path: tuple[str | int, ...], searched: list[Searched], problems: list[str]) -> Any:
    """The template (each searched value replaced by None) and the searched values found on the way."""
    if _is_node(value, path):
        node = _node(value, path, problems)
        if node is not None:
            searched.append(node)
        return None
    if isinstance(value, dict):
        return {k: _collect(v, (*path, k), searched, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_collect(v, (*path, i), searched, problems) for i, v in enumerate(value)]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _node(spec: dict, path: tuple[str | int, ...], problems: list[str]) -> Searched | None:
    name = _name(path)
    unknown = sorted(set(map(str, spec)) - _NODE_KEYS)
    if unknown:
        problems.append(f"{name}: unknown key(s) {', '.join(unknown)} (a searched value has range or choice, "
                        f"and optionally log, step, int, groups)")
        return None
    if "range" in spec and "choice" in spec:
        problems.append(f"{name}: give range or choice, not both")
        return None
    if "range" not in spec and "choice" not in spec:
        problems.append(f"{name}: a searched value needs range or choice (optionally with log, step, int, groups)")
        return None
    if "choice" in spec:
        choice = spec["choice"]
        if not isinstance(choice, list) or not choice:
            problems.append(f"{name}.choice: a non-empty list is required")
            return None
        if any(not isinstance(c, (str, int, float, bool)) or (_number(c) is False and isinstance(c, float))
               for c in choice):
            problems.append(f"{name}.choice: each choice must be a finite number, a string or true/false")
            return None
        if len(set(map(repr, choice))) != len(choice):
            problems.append(f"{name}.choice: a value is listed twice")
            return None
        if set(spec) - {"choice"}:
            problems.append(f"{name}: log, step, int and groups apply to a range, not to a choice")
            return None
        return Searched(path, name, choice=tuple(choice))
    bounds = spec["range"]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(b) for b in bounds)):
        problems.append(f"{name}.range: [LOW, HIGH] with two finite numbers is required, got {bounds!r}")
        return None
    low, high = bounds
    log, step, integer, groups = spec.get("log", False), spec.get("step"), spec.get("int", False), spec.get("groups")
    found = len(problems)
    if not low < high:
        problems.append(f"{name}.range: LOW must be below HIGH, got {bounds!r}")
    if not isinstance(log, bool) or not isinstance(integer, bool):
        problems.append(f"{name}: log and int must be true or false")
    if log and low <= 0:
        problems.append(f"{name}.range: a log range needs LOW > 0")
    if step is not None and (not _number(step) or step <= 0 or (log and step is not None)):
        problems.append(f"{name}.step: a positive number, not with log")
    if integer and not all(isinstance(b, int) for b in bounds):
        problems.append(f"{name}.range: int ranges need whole-number ends")
    if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool) or not 2 <= groups <= MAX_GROUPS):
        problems.append(f"{name}.groups: a whole number from 2 to {MAX_GROUPS}")
    if len(problems) > found:
        return None
    return Searched(path, name, low=float(low) if not integer else low, high=float(high) if not integer else high,
                    log=log, step=step, integer=integer, groups=groups)


def _set(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _drop_parameters(data: dict, dropped: frozenset[str] | set[str]) -> None:
    """Remove the `dropped` keys from every `parameters` mapping, wherever parameters sit."""
    def prune(node: Any) -> None:
        if isinstance(node, dict):
            params = node.get("parameters")
            if isinstance(params, dict):
                for key in [k for k in params if k in dropped]:
                    del params[key]
                if not params:
                    del node["parameters"]
            for key, child in node.items():
                if key != "parameters":
                    prune(child)
        elif isinstance(node, list):
            for child in node:
                prune(child)
    prune(data)
