"""Recipes: mergekit's schema accepted as written; every mistake named with the allowed values."""

from __future__ import annotations

import pytest

from mergegate import RecipeError, load_recipe
from mergegate.methods import get_method
from mergegate.recipe import evaluate

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_example_recipe_parses_unchanged():
    recipe = load_recipe(MERGEKIT_TIES)
    assert recipe.merge_method == "ties" and recipe.dtype == "float16"
    assert recipe.model_refs()[0] == "TheBloke/Llama-2-13B-fp16" and len(recipe.model_refs()) == 4


def test_gradient_and_filter_values_follow_mergekit():
    weight = get_method("ties").per_model_params[0]
    assert evaluate([0, 0.3, 0.7, 1], weight, "model.layers.0.mlp.up_proj.weight", 0.0, "w") == 0
    assert evaluate([0, 1], weight, "x", 0.5, "w") == pytest.approx(0.5)
    assert evaluate([0, 1, 0], weight, "x", 0.25, "w") == pytest.approx(0.5)
    assert evaluate([0, 0.3, 0.7, 1], weight, "x", 1.0, "w") == pytest.approx(1.0)
    recipe = load_recipe(MERGEKIT_TIES)
    setting = recipe.models[2].parameters["weight"]
    assert evaluate(setting, weight, "model.layers.3.mlp.down_proj.weight", 0.3, "w") == 0.5
    assert evaluate(setting, weight, "model.layers.3.self_attn.q_proj.weight", 0.3, "w") == 0


def test_unknown_top_level_key_is_named_with_the_allowed_keys():
    with pytest.raises(RecipeError, match=r"unknown key 'merge_methd'.*allowed: merge_method"):
        load_recipe({"merge_methd": "ties", "models": [{"model": "a"}]})


def test_unknown_parameter_is_named_with_the_method_s_parameters():
    text = MERGEKIT_TIES.replace("density: 0.5", "densty: 0.5")
    with pytest.raises(RecipeError, match=r"models\[1\].parameters.densty: unknown parameter 'densty' for ties "
                                          r"\(allowed here: weight, density\)"):
        load_recipe(text)


@pytest.mark.parametrize("bad, message", [
    ("density: 0.5", "parameter 'density' must be a number, got 'high'"),
    ("normalize: true", "parameter 'normalize' must be true or false, got 3"),
    ("density: 0.33", r"parameter 'density' must be within \[0.0, 1.0\], got 1.5"),
])
def test_bad_values_name_the_field(bad, message):
    replacement = {"density: 0.5": "density: high", "normalize: true": "normalize: 3",
                   "density: 0.33": "density: 1.5"}[bad]
    with pytest.raises(RecipeError, match=message):
        load_recipe(MERGEKIT_TIES.replace(bad, replacement))


def test_bad_dtype_lists_the_allowed_values():
    with pytest.raises(RecipeError, match=r"dtype: Input should be 'float32', 'float16', 'bfloat16' or 'float64'"):
        load_recipe(MERGEKIT_TIES.replace("dtype: float16", "dtype: float8"))


def test_method_rules_are_checked():
    with pytest.raises(RecipeError, match="ties needs base_model"):
        load_recipe({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    with pytest.raises(RecipeError, match="slerp takes exactly 1 models besides base_model, got 2"):
        load_recipe({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5},
                     "models": [{"model": "a"}, {"model": "c"}]})
    with pytest.raises(RecipeError, match="unknown method 'soup'"):
        load_recipe({"merge_method": "soup", "models": [{"model": "a"}]})


def test_not_yet_supported_mergekit_keys_say_so():
    with pytest.raises(RecipeError, match="'modules' .* is not supported by this version"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "modules": {"text": {}}})


def test_slices_are_checked_per_slice():
    with pytest.raises(RecipeError, match="exactly one of 'models'.* or 'slices'"):
        load_recipe({"merge_method": "passthrough"})
    with pytest.raises(RecipeError, match=r"slices\[0\].sources\[0\].layer_range: need 0 <= start < stop"):
        load_recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]})
    with pytest.raises(RecipeError, match=r"slices\[1\]: passthrough takes exactly 1 models, got 2"):
        load_recipe({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [0, 1]}]}]})
    with pytest.raises(RecipeError, match=r"slices\[0\].sources\[0\].parameters.weight: unknown parameter"):
        load_recipe({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1}}]}]})
    recipe = load_recipe({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]})
    assert recipe.model_refs() == ["a", "b"]


def test_invalid_yaml_and_missing_file_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe("models: [\n  - a\n")
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")


def test_dtype_aliases_and_yaml_round_trip():
    recipe = load_recipe(MERGEKIT_TIES.replace("dtype: float16", "dtype: bf16"))
    assert recipe.dtype == "bfloat16"
    assert load_recipe(recipe.to_yaml()).model_dump() == recipe.model_dump()


def test_the_folder_relative_models_resolve_from_is_given_to_the_loader_not_set_afterwards(tmp_path):
    from mergegate.recipe import Recipe

    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    assert load_recipe(data).folder is None
    assert load_recipe(data, folder=tmp_path).folder == tmp_path
    assert load_recipe(yaml_text := "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n",
                       folder=tmp_path).folder == tmp_path
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml_text)
    assert load_recipe(recipe_file).folder == tmp_path.resolve()
    assert Recipe.model_validate(data, context={"folder": tmp_path}).folder == tmp_path
    assert Recipe.model_validate(data).folder is None
    # a copy keeps it (the search changes a drawn recipe by copying it)
    assert load_recipe(data, folder=tmp_path).model_copy().folder == tmp_path
