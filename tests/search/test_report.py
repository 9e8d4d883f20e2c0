"""The search report's best.yaml: the winning recipe with its model paths relative to the report, read as
ModelRef reads a recipe's model (a path, or PATH+ADAPTER)."""

from __future__ import annotations

import os

import yaml

from mergegate.search.report import _method, _names_adapters, portable_recipe


def test_model_paths_become_relative_to_the_report_and_adapters_keep_their_spelling(tmp_path):
    models, out = tmp_path / "models", tmp_path / "search-out"
    for name in ("base", "tool", "lora", "v1+extra"):  # a folder whose name holds a '+' is one path
        (models / name).mkdir(parents=True)
    out.mkdir()
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "tool", "parameters": {"weight": 1.0}},
                         {"model": "base+lora", "parameters": {"weight": 0.5}},
                         {"model": str(models / "v1+extra"), "parameters": {"weight": 0.5}}]}
    portable = yaml.safe_load(portable_recipe(yaml.safe_dump(recipe, sort_keys=False), models, out))
    up = os.path.join("..", "models")
    assert portable["base_model"] == os.path.join(up, "base")
    assert [m["model"] for m in portable["models"]] == [os.path.join(up, "tool"),
                                                       f"{os.path.join(up, 'base')}+{os.path.join(up, 'lora')}",
                                                       os.path.join(up, "v1+extra")]
    assert _names_adapters(yaml.safe_dump(portable)) and not _names_adapters(yaml.safe_dump(recipe | {"models": []}))


def test_a_trial_without_a_recipe_has_no_method():
    class Record:
        recipe_yaml = ""

    assert _method(Record()) == "?"
