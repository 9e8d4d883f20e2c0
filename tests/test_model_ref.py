"""ModelRef: the one spelling of a model reference, parsed in one place; every text gives a ModelRef or a
ModelRefError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergegate.errors import MergegateError, ModelRefError
from mergegate.model_ref import EndpointSettings, ModelRef
from mergegate.rollout import PlanModel


@pytest.mark.parametrize("text, expected", [
    ("./models/base", ModelRef("base", Path("models/base"))),
    ("math=./models/math", ModelRef("math", Path("models/math"))),
    ("./base+./lora", ModelRef("lora", Path("base"), adapter=Path("lora"))),
    ("tuned=/m/base+/m/lora", ModelRef("tuned", Path("/m/base"), adapter=Path("/m/lora"))),
    ("up=http://127.0.0.1:8000/v1#primary", ModelRef("up", url="http://127.0.0.1:8000/v1", served_model="primary")),
    ("up=https://host/v1", ModelRef("up", url="https://host/v1")),
    ("x=y=z", ModelRef("x", Path("y=z"))),  # the first '=' ends the name
])
def test_every_spelling(text, expected):
    assert ModelRef.parse(text) == expected


def test_a_path_that_exists_is_a_path_whatever_it_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a+b").mkdir()
    (tmp_path / "k=v").mkdir()
    assert ModelRef.parse("a+b") == ModelRef("a+b", Path("a+b"))
    assert ModelRef.parse("k=v") == ModelRef("k=v", Path("k=v"))
    assert ModelRef.parse("named=a+b") == ModelRef("named", Path("a+b"))


def test_a_given_name_takes_the_text_as_a_location():
    assert ModelRef.parse("k=v", name="recipe ref") == ModelRef("recipe ref", Path("k=v"))
    assert ModelRef.parse("b+l", name="n") == ModelRef("n", Path("b"), adapter=Path("l"))
    assert ModelRef.parse("http://h:1/v1#m", name="n") == ModelRef("n", url="http://h:1/v1", served_model="m")


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("=./base", "empty name before '='"),
    ("m=", "no path or url"),
    ("base+", "needs both a model and an adapter"),
    ("+lora", "needs both a model and an adapter"),
    ("http://host/v1", r"a remote model needs a name \(NAME=URL\)"),
    ("m=http://host:99999/v1", "not a valid url"),
    ("m=http://[::1/v1", "not a valid url"),
    ("m=http:///v1", "the url has no host"),
    ("m=http://host/v 1", "cannot contain spaces"),
    (".", r"no name can be taken from the path \(write NAME=PATH\)"),
    ("a\0b", "NUL"),
    ("\n=./base", "a name must be non-empty printable text"),
])
def test_malformed_references_are_refused_naming_the_text(text, message):
    with pytest.raises(ModelRefError, match=message) as refused:
        ModelRef.parse(text)
    assert repr(text) in str(refused.value)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of a local path or a url"),
    ({"path": Path("p"), "url": "http://h/v1"}, "exactly one of a local path or a url"),
    ({"url": "http://h/v1", "adapter": Path("a")}, "an adapter applies to a local folder"),
    ({"path": Path("p"), "served_model": "s"}, "a served model name applies to a url"),
])
def test_a_ref_is_local_or_remote(kwargs, message):
    with pytest.raises(ModelRefError, match=message):
        ModelRef("m", **kwargs)


def test_text_paths_become_paths():
    ref = ModelRef("m", "models/base", adapter="lora")  # type: ignore[arg-type]
    assert ref.path == Path("models/base") and ref.adapter == Path("lora")


def test_resolve_prefers_the_working_directory_then_the_folder(tmp_path, monkeypatch):
    work, recipes = tmp_path / "work", tmp_path / "recipes"
    (work / "both").mkdir(parents=True)
    (recipes / "both").mkdir(parents=True)
    (recipes / "only_beside").mkdir()
    (recipes / "lora").mkdir()
    monkeypatch.chdir(work)
    assert ModelRef.parse("both").resolve(recipes).path == Path("both")  # the working directory first, as mergekit
    beside = ModelRef.parse("only_beside+lora").resolve(recipes)
    assert beside.path == recipes / "only_beside" and beside.adapter == recipes / "lora"
    assert ModelRef.parse("nowhere").resolve(recipes).path == Path("nowhere")  # left for its reader to name
    assert ModelRef.parse("/abs/x").resolve(recipes).path == Path("/abs/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelRef.parse("~/work").resolve().path == work
    remote = ModelRef.parse("u=http://h/v1")
    assert remote.resolve(recipes) is remote


def test_plan_entries_are_built_from_refs_and_give_them_back(tmp_path):
    local = ModelRef("m", tmp_path / "base", adapter=tmp_path / "lora")
    entry = PlanModel.from_ref(local, "source")
    assert entry == PlanModel(role="source", path=str(tmp_path / "base"), adapter=str(tmp_path / "lora"))
    assert entry.to_ref("m") == local
    remote = ModelRef("r", url="http://h:1/v1", served_model="primary")
    entry = PlanModel.from_ref(remote, "candidate")
    assert entry.url == "http://h:1/v1" and entry.upstream_model == "primary" and entry.path is None
    assert entry.to_ref("r") == remote


def test_plan_entries_refuse_what_a_ref_refuses():
    with pytest.raises(ValueError, match="an 'adapter' applies to a local 'path'"):
        PlanModel(url="http://h/v1", adapter="/a")
    with pytest.raises(ValueError, match="'upstream_model' applies to a 'url'"):
        PlanModel(path="/p", upstream_model="m")


def test_a_remote_model_is_evaluated_through_its_server_never_loaded_in_process(tmp_path):
    from mergegate.evaluate.local import load_model
    from mergegate.evaluate.runner import check_models

    remote = ModelRef("upstream", url="http://127.0.0.1:9/v1")
    check_models([remote], EndpointSettings())  # no local folder to check: the endpoint runner calls it
    with pytest.raises(MergegateError, match="model 'upstream': http://127.0.0.1:9/v1 is a remote model; it is "
                                             "called through its server, not loaded"):
        load_model(remote)


def test_a_recipe_cannot_merge_a_url():
    from mergegate import RecipeError, plan_merge

    recipe = {"merge_method": "linear", "models": [{"model": "http://h/v1", "parameters": {"weight": 1.0}},
                                                   {"model": "https://h/v1", "parameters": {"weight": 1.0}}]}
    with pytest.raises(RecipeError, match="model 'http://h/v1': a recipe merges local folders"):
        plan_merge(recipe)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab=+:/#.~ \0\n%[]-_h") | st.characters(), max_size=40),
       st.one_of(st.none(), st.text(max_size=8)))
def test_any_text_gives_a_ref_or_the_projects_error(text, name):
    try:
        ref = ModelRef.parse(text, name=name)
    except ModelRefError as exc:
        assert repr(text) in str(exc)
        return
    assert (ref.path is None) != (ref.url is None) and ref.name


_part = st.text(alphabet=st.sampled_from("abc_-.0123456789"), min_size=1, max_size=6).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.builds(lambda n, p, a: ModelRef(n, Path("models", p), adapter=Path("adapters", a) if a else None),
              _part, _part, st.one_of(st.none(), _part)),
    st.builds(lambda n, host, port, served: ModelRef(n, url=f"http://{host}:{port}/v1", served_model=served),
              _part, st.sampled_from(["localhost", "127.0.0.1", "gpu-1.internal"]), st.integers(1, 65535),
              st.one_of(st.none(), _part)),
))
def test_the_written_spelling_reads_back(ref):
    assert ModelRef.parse(str(ref)) == ref
