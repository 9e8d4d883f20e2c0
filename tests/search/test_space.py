"""The search space syntax: ranges, choices, gradients, conditional parameters, and every bad value reported."""

from __future__ import annotations

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergegate.errors import SearchSpaceError
from mergegate.search import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_text(merge_method="task_arithmetic", weight="1.0", extra="", parameters="lambda: 0.5"):
    return (f"merge_method: {merge_method}\nbase_model: /m/base\nmodels:\n"
            f"  - model: /m/a\n    parameters: {{weight: {weight}{extra}}}\n"
            f"  - model: /m/b\n    parameters: {{weight: 1.0{extra}}}\n"
            f"parameters: {{{parameters}}}\n")


def draw(space, seed=0, n=1):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append((space.point(trial), dict(trial.params)))
        study.tell(trial, 0.0)
    return points


def test_a_plain_recipe_is_a_space_of_one_point():
    space = load_space(space_text())
    assert space.searched == ()
    (recipe, params), (again, _) = draw(space, n=2)
    assert params == {}
    assert recipe.to_yaml() == again.to_yaml()
    assert recipe.parameters == {"lambda": 0.5}


def test_ranges_choices_and_groups_are_drawn_within_their_bounds():
    space = load_space(space_text(weight="{range: [0.2, 0.8], groups: 3}",
                                  parameters="lambda: {choice: [0.5, 1.0]}"))
    assert [node.name for node in space.searched] == ["models[0].parameters.weight", "parameters.lambda"]
    for recipe, params in draw(space, n=5):
        gradient = recipe.models[0].parameters["weight"]
        assert isinstance(gradient, list) and len(gradient) == 3  # mergekit's gradient: one value per depth group
        assert all(0.2 <= value <= 0.8 for value in gradient)
        assert recipe.parameters["lambda"] in (0.5, 1.0)
        assert set(params) == {"models[0].parameters.weight[0]", "models[0].parameters.weight[1]",
                               "models[0].parameters.weight[2]", "parameters.lambda"}


def test_method_parameters_are_conditional_on_the_drawn_method():
    # (epsilon below 0.1: della refuses density 0.9 with epsilon 0.1, and a space is refused if it can draw that)
    space = load_space(space_text(merge_method="{choice: [ties, della]}", extra=", density: {range: [0.3, 0.9]}",
                                  parameters="lambda: 0.5, epsilon: {range: [0.01, 0.09]}"))
    methods = set()
    for recipe, params in draw(space, n=12):
        methods.add(recipe.merge_method)
        assert all(0.3 <= m.parameters["density"] <= 0.9 for m in recipe.models)
        if recipe.merge_method == "ties":  # ties has no epsilon: neither drawn nor written
            assert recipe.parameters == {"lambda": 0.5}
            assert "parameters.epsilon" not in params
        else:
            assert 0.01 <= recipe.parameters["epsilon"] <= 0.1
    assert methods == {"ties", "della"}


def test_every_bad_searched_value_is_reported_at_once():
    text = space_text(weight="{range: [0.9, 0.1]}", parameters="lambda: {choice: []}, k: {range: [1, 2], log: 3}")
    with pytest.raises(SearchSpaceError) as caught:
        load_space(text)
    message = str(caught.value)
    assert "models[0].parameters.weight.range: LOW must be below HIGH" in message
    assert "parameters.lambda.choice: a non-empty list is required" in message
    assert "parameters.k: log and int must be true or false" in message


@pytest.mark.parametrize("text, expected", [
    (space_text(parameters="lambada: {range: [0.1, 1.0]}"), "lambada are declared by no method"),
    (space_text(merge_method="{choice: [task_arithmetic, tiess]}"), "unknown method 'tiess'"),
    (space_text(weight="{range: [0.1, 1.0], scale: 2}"), "unknown key(s) scale"),
    (space_text(weight="{range: [0.1, 1.0], groups: 1}"), "groups: a whole number from 2"),
    (space_text(weight="{choice: [1.0, 2.0], log: true}"), "apply to a range, not to a choice"),
    (space_text(weight="{range: [.nan, 1.0]}"), "two finite numbers"),
    (space_text(parameters="lambda: 0.5, lamda: 0.5"), "lamda"),  # a fixed typo reaches the recipe check
])
def test_bad_spaces_are_refused_naming_the_field(text, expected):
    with pytest.raises(SearchSpaceError) as caught:
        load_space(text)
    assert expected in str(caught.value)


def test_a_space_hash_changes_with_what_is_searched():
    one = load_space(space_text(weight="{range: [0.2, 0.8]}"))
    assert one.sha256 == load_space(space_text(weight="{range: [0.2, 0.8]}")).sha256
    assert one.sha256 != load_space(space_text(weight="{range: [0.2, 0.9]}")).sha256


class RandomDraws:
    """A trial that draws uniformly (cheaper than an Optuna study per example)."""

    def __init__(self, seed):
        import random

        self.random = random.Random(seed)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self.random.uniform(low, high)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self.random.randint(low, high)

    def suggest_categorical(self, name, choices):
        return self.random.choice(choices)


@settings(max_examples=40, deadline=None)
@given(low=st.floats(-10, 10, allow_nan=False), width=st.floats(-1, 5, allow_nan=False),
       groups=st.one_of(st.none(), st.integers(-1, 20)), log=st.booleans(),
       choice=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.booleans()),
                       max_size=4))
def test_any_near_valid_space_loads_or_is_refused_with_a_search_space_error(low, width, groups, log, choice):
    node = f"{{range: [{low!r}, {low + width!r}], log: {str(log).lower()}" + (f", groups: {groups}}}" if groups is not None
                                                                             else "}")
    values = ", ".join(repr(c) if not isinstance(c, bool) else str(c).lower() for c in choice)
    for text in (space_text(weight=node), space_text(parameters=f"lambda: {{choice: [{values}]}}")):
        try:
            space = load_space(text)
        except SearchSpaceError:
            continue
        for seed in range(3):  # whatever loads draws valid recipes
            assert space.point(RandomDraws(seed)).merge_method == "task_arithmetic"


@pytest.mark.parametrize("weight, key", [
    ("{rnage: [0.3, 1.5]}", "rnage"),  # a misspelt range: no range or choice left, so it looked like a value
    ("{rnage: [0.3, 1.5], log: true}", "rnage"),
    ("[{rnage: [0.3, 1.5]}, 1.0]", "rnage"),  # inside a gradient list
])
def test_a_misspelt_key_of_a_searched_value_is_named_once_with_where_it_is(weight, key):
    text = space_text(merge_method="{choice: [ties, della, dare_ties]}", weight=weight,
                      extra=", density: {range: [0.3, 0.8]}", parameters="lambda: {range: [0.5, 1.0]}")
    with pytest.raises(SearchSpaceError) as caught:
        load_space(text)
    message = str(caught.value)
    assert "models[0].parameters.weight" in message and f"unknown key(s) {key}" in message
    assert message.count(key) == 1 and "\n" not in message and len(message) < 400, message


def test_a_searched_value_without_range_or_choice_is_refused_naming_it():
    with pytest.raises(SearchSpaceError, match=r"models\[0\]\.parameters\.weight: a searched value needs range or "):
        load_space(space_text(weight="{log: true, step: 0.1}"))


@pytest.mark.parametrize("density, epsilon", [
    ("{range: [0.3, 1.0]}", "{range: [0.05, 0.1]}"),  # a density just below 1 leaves no room for any epsilon
    ("{range: [0.3, 0.95]}", "{range: [0.01, 0.086]}"),  # both at their highest: 0.95 + 0.086 >= 1
    ("{range: [0.05, 0.5]}", "0.15"),  # epsilon fixed (or by default 0.15) against a density below it
    ("{range: [0.3, 0.9]}", None),  # epsilon's default, 0.15, against the highest density
])
def test_a_space_whose_points_break_a_methods_joint_rule_is_refused_when_it_loads(density, epsilon):
    parameters = "lambda: 0.5" + (f", epsilon: {epsilon}" if epsilon else "")
    text = space_text(merge_method="{choice: [ties, della]}", extra=f", density: {density}", parameters=parameters)
    with pytest.raises(SearchSpaceError) as caught:
        load_space(text)
    message = str(caught.value)
    assert "merge_method della" in message and "density" in message and "epsilon" in message, message
    assert "\n" not in message


def test_a_space_whose_every_point_keeps_a_methods_joint_rule_loads_and_draws_only_valid_points():
    from mergegate.methods import get_method

    space = load_space(space_text(merge_method="della", extra=", density: {range: [0.3, 0.8]}",
                                  parameters="lambda: 0.5, epsilon: {range: [0.01, 0.15]}"))
    method = get_method("della")
    for seed in range(50):
        recipe = space.point(RandomDraws(seed))
        for model in recipe.models:
            method.per_model(weight=1.0, density=model.parameters["density"], epsilon=recipe.parameters["epsilon"])


def test_a_space_past_the_yaml_size_bound_is_refused_unparsed(tmp_path):
    huge = "merge_method: linear\nmodels:\n" + "  - {model: /m/a, parameters: {weight: 1.0}}\n" * 30_000
    path = tmp_path / "space.yaml"
    path.write_text(huge)
    for source in (path, huge):  # a file, or YAML text
        with pytest.raises(SearchSpaceError, match="larger than 1 MiB, the most a YAML input may hold"):
            load_space(source)
