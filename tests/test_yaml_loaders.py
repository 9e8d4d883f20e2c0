"""Recipes, gate policies and rollout plans are read by one loader (mergegate._yaml): the same refusals, worded
the same way, each starting with where the problem is."""

from __future__ import annotations

import pytest

from mergegate import RecipeError, load_recipe
from mergegate.gate import PolicyError, load_policy
from mergegate.rollout import PlanError, load_plan

LOADERS = [(load_recipe, RecipeError, "{path}"), (load_policy, PolicyError, "policy {path}"),
           (load_plan, PlanError, "rollout plan {path}")]
BOMB = ("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n")


@pytest.mark.parametrize("load, error, where", LOADERS)
@pytest.mark.parametrize("content, message", [
    (b"a: 1\n# caf\xe9\n", r"line 2: not valid UTF-8 \(byte 0xe9 at column 6\)"),
    (b"a: [1\n", r"line 2, column 1: not valid YAML \(expected ',' or '\]', but got '<stream end>' while parsing a "
                 r"flow sequence\)"),
    (b"a: 1\n  b: 2\n", r"line 2, column 4: not valid YAML \(mapping values are not allowed here\)"),
    (b"a: !!python/object/apply:os.system ['true']\n", r"line 1, column 4: not valid YAML \(could not determine a "
                                                        r"constructor for the tag 'tag:yaml.org,2002:python/object"),
    (b"a: \x01\n", r"line 1, column 4: not valid YAML \(character #x0001: special characters are not allowed\)"),
    (b"a: [" + b"[" * 150 + b"]" * 151 + b"\n", r"nested too deeply \(more than 100 levels\)"),
    (BOMB.encode(), r"the document expands to more than 100000 values \(YAML aliases\?\)"),
    (b"- a\n- b\n", r"expected a mapping of .*, got list"),
    # past the size bound: refused unparsed (parsed, it would be refused for its 500,000 values, after seconds)
    (b"a: [" + b"1," * (1 << 19) + b"1]\n", r"larger than 1 MiB, the most a YAML input may hold \(refused unparsed\)"),
])
def test_every_loader_refuses_a_bad_file_the_same_way(tmp_path, load, error, where, content, message):
    path = tmp_path / "file.yaml"
    path.write_bytes(content)
    with pytest.raises(error, match=f"^{where.format(path=path)}: {message}") as info:
        load(path)
    assert "\n" not in str(info.value)


def test_a_byte_order_mark_is_accepted(tmp_path, family):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 3\n")
    assert load_policy(path).seed == 3
    plan = tmp_path / "rollout.yaml"
    plan.write_bytes(b"\xef\xbb\xbf" + f"candidate: m\nmodels: {{m: {{path: {family['base']}}}}}\nroutes: {{}}\n"
                     f"default: {{model: m}}\n".encode())
    assert load_plan(plan).candidate == "m"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\xef\xbb\xbfmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    assert load_recipe(recipe).merge_method == "linear"


def test_plan_validation_errors_are_one_line_with_field_paths(tmp_path):
    path = tmp_path / "rollout.yaml"
    path.write_text("candidate: m\nmodels: {m: {path: /x, colour: red}}\nroutes: {}\ndefault: {model: m}\n")
    with pytest.raises(PlanError, match=rf"^rollout plan {path}: models\.m\.colour: Extra inputs are not permitted$"):
        load_plan(path)
