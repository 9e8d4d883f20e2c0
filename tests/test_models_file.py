"""Models files: named model blocks (folders, or servers with their own endpoint settings) usable wherever a
model reference is; every bad entry reported at once; a block's settings override the command's for its model
alone and never enter the cache key. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mergegate.errors import EvaluationError, ModelRefError, PlanError
from mergegate.evaluate import EvalOptions, evaluate_models
from mergegate.evaluate.endpoint import EndpointSettings as ReExported
from mergegate.model_ref import EndpointOverrides, EndpointSettings, ModelRef, load_models_file, resolve_model_ref
from mergegate.registry import Registry
from mergegate.rollout import PlanModel

# the loopback servers' fixtures (conftest.py) are requested by name (getfixturevalue)
from tests.evaluate.helpers import tiny_suite

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
FAST = EndpointSettings(concurrency=2, timeout_s=30, retries=3, backoff_s=0.05)


def _models_file(tmp_path: Path, models, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def test_the_issue_example_parses(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "models.yaml"
    path.write_text("models:\n"
                    "  candidate: {base_url: http://gpu-1:8000/v1, model: merged-ties, api_key_env: VLLM_KEY,\n"
                    "              concurrency: 32, timeout_s: 120, retries: 3}\n"
                    "  base: {path: ./base}\n"
                    "  math: {path: ./base, adapter: ./math_lora}\n")
    refs = load_models_file(path)
    assert list(refs) == ["candidate", "base", "math"]
    assert refs["candidate"] == ModelRef("candidate", url="http://gpu-1:8000/v1", served_model="merged-ties",
                                         endpoint=EndpointOverrides(32, 120.0, 3, "VLLM_KEY"))
    assert refs["base"].path == tmp_path / "base"  # found beside the file, as a recipe's paths are
    assert refs["math"].adapter == Path("math_lora")  # found nowhere: kept as written (its reader names it)
    assert ReExported is EndpointSettings
    command = EndpointSettings(concurrency=4, retries=1, backoff_s=0.1)
    assert refs["candidate"].endpoint_settings(command) == EndpointSettings(32, 120.0, 3, "VLLM_KEY", 0.1)
    assert refs["base"].endpoint_settings(command) is command


def test_names_resolve_from_the_file_and_other_references_as_before(tmp_path):
    refs = load_models_file(_models_file(tmp_path, {"up": {"base_url": "http://127.0.0.1:9/v1"}}))
    assert resolve_model_ref("up", refs) is refs["up"]
    assert resolve_model_ref("x=http://h:1/v1#m", refs) == ModelRef("x", url="http://h:1/v1", served_model="m")
    assert resolve_model_ref("up", {}) == ModelRef.parse("up").resolve()


def test_every_bad_entry_is_reported_at_once(tmp_path):
    path = _models_file(tmp_path, {
        "good": {"path": str(DEMO / "models" / "base")},
        "scheme": {"base_url": "ftp://host/v1"},
        "both": {"path": ".", "base_url": "http://h/v1"},
        "neither": {"model": "m"},
        "local_settings": {"path": ".", "retries": 2, "api_key_env": "K"},
        "adapter_on_url": {"base_url": "http://h/v1", "adapter": "./a"},
        "zero": {"base_url": "http://h/v1", "concurrency": 0, "timeout_s": -1},
        "typo": {"path": ".", "adaptor": "./a"},
        "env": {"base_url": "http://h/v1", "api_key_env": "not a name"},
        "port": {"base_url": "http://h:99999/v1"},
        "scalar": 3,
    })
    with pytest.raises(ModelRefError) as caught:
        load_models_file(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"models file {path}: 10 bad entries:"
    text = "\n".join(lines)
    for expected in ["models.scheme: base_url: url 'ftp://host/v1': the scheme must be http or https, not 'ftp'",
                     "models.both: needs exactly one of 'path' or 'base_url'",
                     "models.neither: needs exactly one of 'path' or 'base_url'",
                     "models.local_settings: api_key_env, retries apply to a 'base_url', not to a local 'path'",
                     "models.adapter_on_url: an 'adapter' applies to a local 'path', not to a 'base_url'",
                     "models.zero: concurrency: Input should be greater than or equal to 1; timeout_s: Input should "
                     "be greater than 0",
                     "models.typo: adaptor: Extra inputs are not permitted",
                     "models.env: api_key_env: String should match pattern",
                     "models.port: ", "not a valid url",
                     "models.scalar: Input should be a valid dictionary"]:
        assert expected in text
    assert "good" not in text


def test_a_refused_file_names_its_missing_folders_too(tmp_path):
    """A file refused for its schema names every other problem it has at once: no fixing one error to see the next."""
    path = _models_file(tmp_path, {
        "gone": {"path": "./gone"},
        "late": {"base_url": "http://h/v1", "timeout_s": float("nan")},
        "unadapted": {"path": str(DEMO / "models" / "base"), "adapter": "./no_adapter"},
        "fine": {"path": str(DEMO / "models" / "base")},
        "not_a_model": {"path": str(tmp_path)},
    })
    with pytest.raises(ModelRefError) as caught:
        load_models_file(path)
    assert str(caught.value).splitlines() == [
        f"models file {path}: 4 bad entries:",
        "  models.gone: gone: no such folder",
        "  models.late: timeout_s: NaN is not a number",
        "  models.unadapted: adapter no_adapter: no such folder",
        f"  models.not_a_model: {tmp_path} has no config.json (not a model folder)"]


@pytest.mark.parametrize("text, message", [
    ("", "expected a mapping of 'models', got NoneType"),
    ("models: []\n", "models: expected a mapping of names to model blocks, got list"),
    ("models: {}\n", "models: no models"),
    ("model: {}\n", "unknown field(s) ['model']"),
    ("models: {a: {path: .}\n", "not valid YAML"),
])
def test_a_file_that_is_not_a_models_file(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ModelRefError, match=r"^models file .*m\.yaml: .*" + __import__("re").escape(message)):
        load_models_file(path)


_FIELDS = ["path", "adapter", "base_url", "model", "api_key_env", "concurrency", "timeout_s", "retries", "extra"]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.floats(allow_nan=False, allow_infinity=True),
                    st.text(max_size=6), st.sampled_from(["http://h:8000/v1", "https://h/v1#m", "http://", ".",
                                                          "KEY_1", "ftp://x", "http://h:0/v1", "http://[::1/v1"]),
                    st.lists(st.text(max_size=2), max_size=2))
_BLOCK = st.one_of(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=5),
                   st.fixed_dictionaries({"base_url": st.sampled_from(["http://h:8000/v1", "http://h/v1#x", "x"])},
                                         optional={f: _VALUES for f in ("model", "concurrency", "retries")}),
                   _VALUES)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(models=st.dictionaries(st.one_of(st.text(max_size=5), st.integers(0, 3)), _BLOCK, max_size=4))
def test_near_valid_blocks_are_references_or_one_error_naming_the_entries(tmp_path, models):
    path = _models_file(tmp_path, models)
    try:
        refs = load_models_file(path)
    except ModelRefError as exc:
        message = str(exc)
        assert message.startswith(f"models file {path}: ") and "Traceback" not in message
        if "bad entries" in message:  # one line per bad entry, each naming it
            assert all(line.startswith(("  models.", "  models[")) for line in message.splitlines()[1:])
    else:
        assert list(refs) == list(models) and all(isinstance(ref, ModelRef) for ref in refs.values())
        for name, ref in refs.items():
            assert ref.name == name and (ref.url is None) == ("base_url" not in models[name])


@pytest.mark.slow
def test_a_blocks_retries_override_the_commands_for_its_model_only(request, tmp_path):
    server = request.getfixturevalue("scripted")
    refs = load_models_file(_models_file(tmp_path, {
        "strict": {"base_url": server.url, "model": "m", "retries": 0},
        "patient": {"base_url": server.url, "model": "m"}}))
    suite = tiny_suite(tmp_path)
    server.busy = 1
    with pytest.raises(EvaluationError, match=r"model 'strict' .*row a failed after 1 try: HTTP 429"):
        evaluate_models([(refs["strict"], "candidate")], suite, Registry(tmp_path / "a.sqlite"),
                        EvalOptions(progress=False, endpoint=FAST))
    server.busy = 1  # the command's 3 retries apply to the block without its own
    runs = evaluate_models([(refs["patient"], "candidate")], suite, Registry(tmp_path / "b.sqlite"),
                           EvalOptions(progress=False, endpoint=FAST))
    assert runs["patient"].results[0].passed and server.calls == 3


@pytest.mark.slow
def test_a_blocks_concurrency_is_not_in_the_cache_key(request, tmp_path):
    server = request.getfixturevalue("scripted")
    suite, registry = tiny_suite(tmp_path), Registry(tmp_path / "r.sqlite")
    first = evaluate_models([(ModelRef("m", url=server.url, endpoint=EndpointOverrides(concurrency=1)), "source")],
                            suite, registry, EvalOptions(progress=False, endpoint=FAST))["m"]
    again = evaluate_models([(ModelRef("m", url=server.url, endpoint=EndpointOverrides(concurrency=16, retries=0,
                                                                                      timeout_s=5)), "source")],
                            suite, registry, EvalOptions(progress=False, endpoint=FAST))["m"]
    assert not first.cached and again.cached and again.run_id == first.run_id and server.calls == 1
    assert "concurrency" not in json.dumps(registry.run_config(first.run_id))


def test_a_blocks_unset_api_key_variable_is_refused_naming_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("MG_TEST_NO_SUCH_KEY", raising=False)
    ref = ModelRef("up", url="http://127.0.0.1:9/v1", endpoint=EndpointOverrides(api_key_env="MG_TEST_NO_SUCH_KEY"))
    with pytest.raises(EvaluationError, match="model 'up': API key variable MG_TEST_NO_SUCH_KEY is not set"):
        evaluate_models([(ref, "candidate")], tiny_suite(tmp_path), Registry(tmp_path / "r.sqlite"),
                        EvalOptions(progress=False))


def test_endpoint_settings_apply_to_a_url_only():
    with pytest.raises(ModelRefError, match="endpoint settings apply to a url"):
        ModelRef("x", Path("."), endpoint=EndpointOverrides(retries=1))


def test_a_plan_model_carries_the_api_key_variable_and_the_gateway_sends_it(monkeypatch):
    from mergegate.gateway.backends import build_backend
    from mergegate.gateway.config import GatewayConfig

    ref = ModelRef("up", url="http://127.0.0.1:9/v1", endpoint=EndpointOverrides(api_key_env="MG_TEST_KEY",
                                                                                   concurrency=3))
    entry = PlanModel.from_ref(ref, "candidate")
    assert entry.api_key_env == "MG_TEST_KEY"
    assert entry.to_ref("up").endpoint == EndpointOverrides(api_key_env="MG_TEST_KEY")
    monkeypatch.setenv("MG_TEST_KEY", "s3cret")
    assert build_backend("up", entry, GatewayConfig()).api_key == "s3cret"
    monkeypatch.delenv("MG_TEST_KEY")
    with pytest.raises(PlanError, match="model 'up': its API key variable MG_TEST_KEY is not set"):
        build_backend("up", entry, GatewayConfig())
    with pytest.raises(ValueError, match="'api_key_env' applies to a 'url'"):
        PlanModel(path=".", api_key_env="K")


@pytest.mark.slow
def test_gate_and_evaluate_cli_take_names_from_a_models_file(request, tmp_path):
    served, suite = request.getfixturevalue("gateway"), request.getfixturevalue("demo_suite")
    from mergegate.cli.main import app

    models = _models_file(tmp_path, {
        "candidate": {"base_url": served, "model": "json_output", "concurrency": 2, "retries": 1},
        "base": {"path": str(DEMO / "models" / "base")},
        "json_output": {"path": str(DEMO / "models" / "json_output")}})
    common = ["--suite", str(suite), "--registry", str(tmp_path / "r.sqlite"), "--max-new-tokens", "8",
              "--models", str(models)]
    out = tmp_path / "out"
    gated = CliRunner().invoke(app, ["gate", "--candidate", "candidate", "--base", "base", "--source", "json_output",
                                     "--out", str(out), *common])
    assert gated.exit_code == 0, (gated.output, gated.exception)
    plan = yaml.safe_load((out / "rollout.yaml").read_text())
    assert plan["models"]["candidate"]["url"] == served and plan["models"]["candidate"]["upstream_model"] == \
        "json_output"
    wide = {"COLUMNS": "200"}  # the table's rows unwrapped
    evaluated = CliRunner().invoke(app, ["evaluate", *common], env=wide)  # no models: every model in the file
    assert evaluated.exit_code == 0, (evaluated.output, evaluated.exception)
    assert all(f"{name} (cached)" in evaluated.output for name in ("candidate", "base", "json_output"))
    one = CliRunner().invoke(app, ["evaluate", "candidate", f"other={DEMO / 'models' / 'base'}", *common], env=wide)
    assert one.exit_code == 0 and "candidate (cached)" in one.output and "other (cached)" in one.output


def test_cli_refuses_a_bad_models_file_with_exit_2(tmp_path):
    from mergegate.cli.main import app

    models = _models_file(tmp_path, {"a": {"path": "."}, "b": {"base_url": "ftp://x"}})
    result = CliRunner().invoke(app, ["gate", "--candidate", "a", "--base", "a", "--source", "b", "--suite",
                                      str(tmp_path / "s.jsonl"), "--models", str(models)])
    assert result.exit_code == 2 and "models.b: base_url" in result.output


def test_release_takes_extra_sources_by_name_and_checks_them_before_merging(tmp_path, monkeypatch):
    from mergegate.cli.main import app

    monkeypatch.delenv("MG_TEST_NO_SUCH_KEY", raising=False)
    models = _models_file(tmp_path, {"up": {"base_url": "http://127.0.0.1:9/v1",
                                            "api_key_env": "MG_TEST_NO_SUCH_KEY"}})
    recipe = next((DEMO / "recipes").glob("*.yaml"))
    result = CliRunner().invoke(app, ["release", str(recipe), "--suite", str(DEMO / "suite.jsonl"), "--out",
                                      str(tmp_path / "out"), "--models", str(models), "--extra-source", "up"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "model 'up': API key variable MG_TEST_NO_SUCH_KEY is not set" in result.output
    assert not (tmp_path / "out" / "candidate").exists()  # refused before the merge


def test_evaluate_without_models_or_a_models_file_is_refused(tmp_path):
    from mergegate.cli.main import app

    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"id": "a", "cohort": "c", "prompt": "p", "expected": "e",
                                 "evaluators": ["exact_match"]}) + "\n")
    result = CliRunner().invoke(app, ["evaluate", "--suite", str(suite), "--registry", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 2 and "no models to evaluate" in result.output
