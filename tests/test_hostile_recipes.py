"""Recipes written to break things: non-finite or out-of-range numbers anywhere a parameter can sit, files that
are not UTF-8 or not YAML, unsafe tags — each refused with a RecipeError naming the field, never another error."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergegate import Recipe, RecipeError, load_recipe
from mergegate.methods import available_methods, get_method
from mergegate.recipe import _leaves  # the loader's own walk over a setting's numbers

TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
               {"model": "b", "parameters": {"weight": 0.5}}],
    "parameters": {"lambda": 1.0},
}


def _with(path: tuple, value) -> dict:
    """A copy of TIES with the setting at `path` (keys and indexes) replaced."""
    recipe = yaml.safe_load(yaml.safe_dump(TIES))
    node = recipe
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return recipe


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("path, value, message", [
    (("models", 1, "parameters", "weight"), NAN, r"models\[1\]\.parameters\.weight: nan is not a finite number"),
    (("models", 1, "parameters", "weight"), INF, r"models\[1\]\.parameters\.weight: inf is not a finite number"),
    (("models", 0, "parameters", "weight"), -INF, r"models\[0\]\.parameters\.weight: -inf is not a finite number"),
    (("models", 0, "parameters", "weight"), "1e400", r"models\[0\]\.parameters\.weight: 1e400 is not a finite"),
    (("models", 0, "parameters", "weight"), 10**400, r"models\[0\]\.parameters\.weight: parameter 'weight' is too "
                                                         r"large \(401 digits\)"),
    (("models", 0, "parameters", "density"), NAN, r"models\[0\]\.parameters\.density: nan is not a finite"),
    (("parameters", "lambda"), NAN, r"parameters\.lambda: nan is not a finite number"),
    (("parameters", "density"), [0.2, NAN], r"parameters\.density: nan is not a finite number"),  # gradient
    (("models", 1, "parameters", "weight"), [{"filter": "mlp", "value": INF}, {"value": 1.0}],
     r"models\[1\]\.parameters\.weight: inf is not a finite number"),  # filter list
    (("models", 1, "parameters", "weight"), [{"filter": "mlp", "value": [1.0, NAN]}, {"value": 1.0}],
     r"models\[1\]\.parameters\.weight: nan is not a finite number"),  # gradient inside a filter
    (("models", 0, "parameters", "weight"), 1e308, r"models\[0\]\.parameters\.weight: parameter 'weight' is too "
                                                   r"large for float32 arithmetic, got 1e\+308"),
    (("models", 0, "parameters", "density"), 1.5, r"parameter 'density' must be within \[0.0, 1.0\], got 1.5"),
    (("models", 0, "parameters", "density"), -0.1, r"parameter 'density' must be within \[0.0, 1.0\]"),
])
def test_non_finite_and_out_of_range_parameters_are_refused_naming_the_field(path, value, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_with(path, value))


@pytest.mark.parametrize("text, message", [
    ("weight: .nan", r"models\[1\]\.parameters\.weight: nan is not a finite number"),
    ("weight: .inf", r"models\[1\]\.parameters\.weight: inf is not a finite number"),
    ("weight: 1e400", r"models\[1\]\.parameters\.weight: 1e400 is not a finite number"),
    ("weight: -.Inf", r"models\[1\]\.parameters\.weight: -inf is not a finite number"),
])
def test_yaml_spellings_of_non_finite_numbers(text, message):
    recipe = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {WEIGHT}
"""
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe.replace("WEIGHT", text))


def test_slice_parameters_are_checked_too():
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"scale": NAN}}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[0\]\.parameters\.scale: nan is not a finite"):
        load_recipe(recipe)
    recipe = {"merge_method": "slerp", "base_model": "a", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}],
         "parameters": {"t": [0.0, INF]}}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.parameters\.t: inf is not a finite number"):
        load_recipe(recipe)


@pytest.mark.parametrize("method, params, message", [
    ("karcher", {"max_iter": -1}, r"'max_iter' must be within \[0, inf\], got -1"),
    ("karcher", {"max_iter": 2.5}, r"'max_iter' must be a whole number, got 2.5"),
    ("karcher", {"max_iter": 10**400}, r"'max_iter' is too large \(401 digits\)"),
    ("karcher", {"max_iter": 2**70}, r"'max_iter' is too large, got 1180591620717411303424"),
    ("karcher", {"max_iter": "12"}, None),  # YAML strings of numbers, as mergekit
    ("karcher", {"tol": -1e-3}, r"'tol' must be within \[0.0, inf\]"),
    ("multislerp", {"eps": -1.0}, r"'eps' must be within \[0.0, inf\]"),
    ("ram", {"epsilon": -1.0}, r"'epsilon' must be within \[0.0, inf\]"),
    ("ramplus_tl", {"alpha": -0.5}, r"'alpha' must be within \[0.0, inf\]"),
    ("della", {"epsilon": 1.5}, r"'epsilon' must be within \[0.0, 1.0\]"),
    ("sce", {"select_topk": NAN}, r"parameters\.select_topk: nan is not a finite number"),
])
def test_each_method_declares_its_ranges(method, params, message):
    spec = get_method(method)
    models = [{"model": "a"}, {"model": "b"}]
    recipe = {"merge_method": method, "models": models, "parameters": params}
    if spec.base != "ignored":
        recipe["base_model"] = "base"
    for p in spec.per_model_params:
        if p.required:
            for m in models:
                m.setdefault("parameters", {})[p.name] = 1.0
    if message is None:
        load_recipe(recipe)
    else:
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe)


def test_every_declared_range_holds_its_default():
    for name in available_methods():
        method = get_method(name)
        for spec in method.shared_params + method.per_model_params:
            if not spec.required and spec.default is not None and spec.kind is not bool:
                assert spec.coerce(spec.default, name) == spec.default, (name, spec.name)


def test_other_numeric_fields_are_bounded():
    base = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    with pytest.raises(RecipeError, match=r"tokenizer\.pad_to_multiple_of: Input should be less than or equal"):
        load_recipe({**base, "tokenizer": {"source": "union", "pad_to_multiple_of": 1e12}})
    with pytest.raises(RecipeError, match=r"tokenizer\.pad_to_multiple_of: Input should be greater than or equal"):
        load_recipe({**base, "tokenizer": {"source": "union", "pad_to_multiple_of": 0}})
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens\.x\.source\.ModelToken\.token_id: Input should be greater"):
        load_recipe({**base, "tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "a",
                                                                        "token_id": -1}}}}})
    assert load_recipe({**base, "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}).tokenizer


# ------------------------------------------------------------------------------------------ recipe files


def test_recipe_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"merge_method: linear\nmodels:\n  - model: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"recipe\.yaml: line 3: not valid UTF-8 \(byte 0xe9 at column 15\)"):
        load_recipe(path)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping of recipe keys, got list"),
    ("just text\n", "expected a mapping of recipe keys, got str"),
    ("", "expected a mapping of recipe keys, got NoneType"),
    ("models: [\n  - a\n", r"line \d+, column \d+: not valid YAML \(.+\)"),
    ("merge_method: !!python/object/apply:os.system ['echo pwned']\n",
     r"line 1, column 15: not valid YAML \(could not determine a constructor for the tag "
     r"'tag:yaml.org,2002:python/object/apply"),
    ("merge_method: !unsafe linear\n", r"not valid YAML \(could not determine a constructor for the tag '!unsafe'"),
    ("when: 2024-02-30\n", r"not valid YAML \(day is out of range"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"not valid YAML \(nested too deeply\)"),
    ("a: " + "[" * 150 + "]" * 150 + "\n", r"nested too deeply \(more than 100 levels\)"),
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
     r"expands to more than \d+ values"),
])
def test_recipe_files_that_are_not_recipes(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(path))


def test_a_path_is_always_a_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe .*recipe\.txt: no such file"):
        load_recipe(tmp_path / "recipe.txt")
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path)


def test_model_paths_must_be_usable():
    with pytest.raises(RecipeError, match=r"model 'a\\x00b' is not a usable path"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a\x00b", "parameters": {"weight": 1}}]})


def test_models_listed_twice_are_refused_like_mergekit():
    with pytest.raises(RecipeError, match=r"models\[1\]: 'a' is listed twice"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                          {"model": "a", "parameters": {"weight": 2}}]})


# ------------------------------------------------------------------------------------- property tests

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8), st.sampled_from(["base", "a", "b", "union", "ties", "linear", "1e400"]))
_values = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.sampled_from(["filter", "value", "model", "parameters", "weight", "density", "t",
                                     "layer_range", "sources", "source", "tokens", "kind", "x"]), children,
                    max_size=4)), max_leaves=12)
_param_names = st.sampled_from(["weight", "density", "lambda", "t", "epsilon", "gamma", "normalize", "max_iter",
                                "scale", "select_topk", "tol", "eps", "nope"])
_number_settings = st.one_of(
    _scalars,
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()), min_size=0, max_size=4),
    st.lists(st.fixed_dictionaries({"value": _scalars},
                                   optional={"filter": st.one_of(st.none(), st.text(max_size=6))}), max_size=3),
)
_params = st.dictionaries(_param_names, _number_settings, max_size=3)
_model_entries = st.lists(st.fixed_dictionaries({"model": st.sampled_from(["a", "b", "base", "c"])},
                                                optional={"parameters": _params}), max_size=4)
_slices = st.lists(st.fixed_dictionaries(
    {"sources": st.lists(st.fixed_dictionaries(
        {"model": st.sampled_from(["a", "b", "base"]),
         "layer_range": st.lists(st.integers(-2, 6), min_size=2, max_size=2)},
        optional={"parameters": _params}), max_size=3)},
    optional={"parameters": _params, "base_model": st.sampled_from(["a", "base"])}), max_size=2)
_recipes = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(available_methods() + ["soup"])},
    optional={
        "models": _model_entries, "slices": _slices, "base_model": st.sampled_from(["base", "a", ""]),
        "parameters": _params, "dtype": st.sampled_from(["bf16", "float32", "float8", 3]),
        "tokenizer_source": st.sampled_from(["base", "union", "a", "zzz"]),
        "tokenizer": st.fixed_dictionaries({}, optional={
            "source": st.sampled_from(["union", "base", "a"]), "pad_to_multiple_of": _scalars,
            "tokens": st.dictionaries(st.text(max_size=4), _values, max_size=2)}),
        "chat_template": _scalars, "calibration": _values, "modules": _values, "extra": _values,
    })


def _loads_or_refuses(source) -> None:
    try:
        recipe = load_recipe(source)
    except RecipeError as exc:
        assert str(exc)
        return
    assert isinstance(recipe, Recipe)
    scopes = [recipe.parameters] + [entry.parameters for entry in recipe.models or []]
    for piece in recipe.slices or []:
        scopes += [piece.parameters] + [source.parameters for source in piece.sources]
    for scope in scopes:  # whatever was accepted holds only finite numbers
        for setting in (scope or {}).values():
            for leaf in _leaves(setting):
                assert not isinstance(leaf, (int, float)) or math.isfinite(float(leaf)), leaf


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_recipes)
def test_load_recipe_on_structured_dicts_gives_a_recipe_or_a_recipe_error(data):
    _loads_or_refuses(data)


_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                     st.sampled_from(["1e400", "-1e400", "nan", "1e-3", "0.5"]))
_number_setting = st.one_of(_numbers, st.lists(_numbers, min_size=1, max_size=3),
                            st.lists(st.fixed_dictionaries({"value": _numbers}, optional={"filter": st.just("mlp")}),
                                     min_size=1, max_size=2))


@settings(max_examples=300, deadline=None)
@given(_number_setting, st.sampled_from(["weight", "density", "lambda", "shared density"]), st.booleans())
def test_near_valid_recipes_accept_only_finite_numbers_in_range(value, key, slices):
    """A valid recipe with one drawn value: accepted only when every number in it is finite (and in range)."""
    per_model, shared = {"weight": 1.0, "density": 0.5}, {"lambda": 1.0}
    if key in per_model:
        per_model[key] = value
    else:
        shared[key.removeprefix("shared ")] = value
    if slices:
        recipe = {"merge_method": "ties", "base_model": "base", "parameters": shared, "slices": [{"sources": [
            {"model": "base", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2], "parameters": per_model}]}]}
    else:
        recipe = {"merge_method": "ties", "base_model": "base", "parameters": shared,
                  "models": [{"model": "a", "parameters": per_model}]}
    _loads_or_refuses(recipe)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _values, max_size=6))
def test_load_recipe_on_arbitrary_dicts_gives_a_recipe_or_a_recipe_error(data):
    _loads_or_refuses(data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.text(max_size=200),
    _recipes.map(lambda r: yaml.safe_dump(r, allow_unicode=True)),
    st.tuples(_recipes.map(lambda r: yaml.safe_dump(r)), st.integers(0, 400), st.text(max_size=6)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),  # a valid recipe with a few characters inserted
))
def test_load_recipe_on_yaml_text_gives_a_recipe_or_a_recipe_error(text):
    _loads_or_refuses(text + "\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_load_recipe_on_file_bytes_gives_a_recipe_or_a_recipe_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_bytes(raw)
    _loads_or_refuses(path)
