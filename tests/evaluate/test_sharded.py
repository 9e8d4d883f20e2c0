"""Evaluation sharded on Ray (evaluate.sharded) records what one process records: the same outputs, scores,
passed flags and token counts per row, one finished run per model in the one registry, for local and url
models; a url model's own settings reach its shards (its API key variable; its concurrency, shared among them).
One local Ray (2 CPUs) serves the module; mergegate uses it as it is and leaves it running."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.evaluate.sharded import shard_endpoint
from mergegate.model_ref import EndpointOverrides, ModelRef
from mergegate.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.one_torch_thread]

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
MODELS = [(ModelRef("base", DEMO / "models" / "base"), "base"),
          (ModelRef("json_output", DEMO / "models" / "json_output"), "candidate")]
FAST = EndpointSettings(concurrency=4, timeout_s=30, retries=2, backoff_s=0.05)


def _answers(run) -> list[tuple]:
    """What must not depend on sharding (latency is measured, so it does)."""
    return [(r.row_id, r.cohort, r.output, r.score, r.passed, r.prompt_tokens, r.completion_tokens, r.details)
            for r in run.results]



@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Three rows per cohort of the demo suite, perplexity rows included (they run in the shards too)."""
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if seen.get(row["cohort"], 0) < 3:
            seen[row["cohort"]] = seen.get(row["cohort"], 0) + 1
            rows.append(row)
    path = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_suite(path)


def test_two_workers_record_what_one_process_records(local_ray, suite, tmp_path):
    alone = evaluate_models(MODELS, suite, Registry(tmp_path / "one.sqlite"),
                            EvalOptions(batch_size=4, max_new_tokens=16, progress=False, device="cpu"))
    registry = Registry(tmp_path / "sharded.sqlite")
    sharded = evaluate_models(MODELS, suite, registry,
                              EvalOptions(batch_size=4, max_new_tokens=16, progress=False, device="cpu", workers=2))
    assert list(sharded) == ["base", "json_output"]
    for name in sharded:
        assert not sharded[name].cached
        assert _answers(sharded[name]) == _answers(alone[name])
    # One finished run per model, holding every row: the driver wrote each shard's rows into the same run.
    runs = registry._read("SELECT model_hash, status FROM eval_runs", ())
    assert sorted((r["model_hash"], r["status"]) for r in runs) == sorted(
        (run.model_hash, "finished") for run in sharded.values())
    for run in sharded.values():
        assert registry.done_rows(run.run_id) == {row.id for row in suite.rows}
    assert local_ray.is_initialized()  # a Ray mergegate did not start is left running
    again = evaluate_models(MODELS, suite, registry,
                            EvalOptions(batch_size=4, max_new_tokens=16, progress=False, device="cpu", workers=2))
    assert all(run.cached for run in again.values())  # the cache holds whichever way the run was made


def test_a_url_model_sharded_answers_as_unsharded(local_ray, suite, tmp_path):
    from mergegate.gateway import create_app
    from mergegate.gateway.testing import ServerThread
    from mergegate.rollout import RolloutPlan

    plan = RolloutPlan.model_validate({"candidate": "json_output", "models": {
        "json_output": {"role": "candidate", "path": str(DEMO / "models" / "json_output")}},
        "routes": {}, "default": {"model": "json_output"}})
    servable = load_suite(_without_perplexity(suite, tmp_path))  # a completions endpoint cannot score them
    with ServerThread(create_app(plan, registry=Registry(tmp_path / "gateway.sqlite"))) as server:
        remote = [(ModelRef("remote", url=server.url + "/v1", served_model="json_output"), "candidate")]
        alone = evaluate_models(remote, servable, Registry(tmp_path / "one.sqlite"),
                                EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST))
        sharded = evaluate_models(remote, servable, Registry(tmp_path / "sharded.sqlite"),
                                  EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST, workers=2))
    assert _answers(sharded["remote"]) == _answers(alone["remote"])
    assert len(sharded["remote"].results) == len(servable.rows)


def test_a_url_models_own_api_key_reaches_the_shards_and_no_ray_log(local_ray, tmp_path, monkeypatch):
    from fastapi.responses import JSONResponse

    from mergegate.gateway.testing import ServerThread
    from tests.evaluate.helpers import Scripted

    key = f"mg-test-secret-{uuid.uuid4().hex}"
    server, seen, refusing = Scripted(), [], []

    @server.app.middleware("http")
    async def bearer_only(request, call_next):  # the server refuses any call without the model's key
        seen.append(request.headers.get("authorization"))
        if seen[-1] != f"Bearer {key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if request.url.path.endswith("/completions") and refusing:  # a server that quotes the key it refuses
            return JSONResponse({"error": {"message": f"key {key} is revoked"}}, status_code=401)
        return await call_next(request)

    # Set after the module's Ray started, so its workers see the key only if the shard's task carries it.
    monkeypatch.setenv("MG_TEST_SHARD_KEY", key)
    path = tmp_path / "four.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "cohort": "c", "prompt": "6*7=", "expected": "42",
                                        "evaluators": ["exact_match"]}) + "\n" for i in range(4)))
    with ServerThread(server.app) as running:
        ref = ModelRef("keyed", url=running.url + "/v1", served_model="m",
                       endpoint=EndpointOverrides(api_key_env="MG_TEST_SHARD_KEY"))
        runs = evaluate_models([(ref, "candidate")], load_suite(path), Registry(tmp_path / "r.sqlite"),
                               EvalOptions(max_new_tokens=4, progress=False, endpoint=FAST, workers=2))
        refusing.append(True)
        with pytest.raises(EvaluationError, match=r"HTTP 401: key \[redacted\] is revoked") as refused:
            evaluate_models([(ref, "candidate")], load_suite(path), Registry(tmp_path / "other.sqlite"),
                            EvalOptions(max_new_tokens=4, progress=False, endpoint=FAST, workers=2))
    assert key not in str(refused.value) and key not in repr(refused.value)
    assert [r.passed for r in runs["keyed"].results] == [True] * 4
    assert server.calls == 4 and set(seen) == {f"Bearer {key}"}
    # Ray's session folder (its logs, its runtime environments' records) never holds the key.
    session = Path(local_ray._private.worker._global_node.get_session_dir_path())
    holding = [str(file) for file in session.rglob("*") if file.is_file() and _holds(file, key.encode())]
    assert not holding


def test_settings_carrying_a_key_never_show_it(monkeypatch):
    """What a sharded evaluation's and a search's Ray tasks are given: the key inside their arguments, unseen."""
    import pickle

    from mergegate.search.ray_tasks import _carrying_key
    from mergegate.search.trial import TrialSpec

    monkeypatch.setenv("MG_TEST_SHARD_KEY", "mg-test-shown-key")
    carrying = EndpointSettings(api_key_env="MG_TEST_SHARD_KEY").with_key()
    trial = _carrying_key(TrialSpec(0, "", None, "f", None, "c", "b", (), {}, None,  # type: ignore[arg-type]
                                    eval=EvalOptions(endpoint=EndpointSettings(api_key_env="MG_TEST_SHARD_KEY"))))
    monkeypatch.delenv("MG_TEST_SHARD_KEY")
    assert trial.eval.endpoint.api_key() == "mg-test-shown-key" and "mg-test-shown-key" not in repr(trial)
    assert carrying.api_key() == "mg-test-shown-key" and not carrying.problems()  # as in a worker without it
    assert pickle.loads(pickle.dumps(carrying)).api_key() == "mg-test-shown-key"
    assert "mg-test-shown-key" not in repr(carrying) + str(carrying) + repr(carrying.key) + str(carrying.key)
    assert carrying == EndpointSettings(api_key_env="MG_TEST_SHARD_KEY")
    # a model's own variable replaces the key the command's settings carry
    own = EndpointOverrides(api_key_env="MG_TEST_OTHER_KEY").apply(carrying)
    monkeypatch.setenv("MG_TEST_OTHER_KEY", "other")
    assert own.api_key() == "other"


def _holds(file: Path, text: bytes) -> bool:
    try:
        return text in file.read_bytes()
    except OSError:  # a socket, or a file gone meanwhile
        return False


def test_a_url_models_own_concurrency_is_shared_among_its_shards():
    own = ModelRef("m", url="http://127.0.0.1:9/v1", endpoint=EndpointOverrides(concurrency=6, api_key_env="K"))
    ref, settings = shard_endpoint(own, FAST, 2)
    assert settings == EndpointSettings(concurrency=3, timeout_s=30, retries=2, api_key_env="K", backoff_s=0.05)
    # the shard's ref has no settings of its own, so the worker's overlay keeps the shared concurrency
    assert ref == replace(own, endpoint=None) and ref.endpoint_settings(settings) == settings
    assert shard_endpoint(ModelRef("m", url="http://127.0.0.1:9/v1"), FAST, 2)[1].concurrency == 2  # the command's
    assert shard_endpoint(own, FAST, 8)[1].concurrency == 1  # never below one request per shard


def _without_perplexity(suite, tmp_path) -> Path:
    path = tmp_path / "servable.jsonl"
    path.write_text("".join(row.model_dump_json(by_alias=True, exclude_none=True) + "\n" for row in suite.rows
                            if "perplexity" not in row.evaluators))
    return path


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_a_bad_workers_value_is_refused_before_anything_runs(workers, suite, tmp_path):
    registry = Registry(tmp_path / "r.sqlite")
    with pytest.raises(EvaluationError, match="workers must be an integer >= 1"):
        evaluate_models(MODELS, suite, registry, EvalOptions(progress=False, workers=workers))
    assert not registry._read("SELECT id FROM eval_runs", ())


def test_cli_refuses_bad_workers_with_the_option_named(tmp_path):
    from mergegate.cli.main import app

    result = CliRunner().invoke(app, ["evaluate", f"base={DEMO / 'models' / 'base'}", "--suite",
                                      str(DEMO / "suite.jsonl"), "--registry", str(tmp_path / "r.sqlite"),
                                      "--workers", "0"])
    assert result.exit_code == 2
    assert "workers must be an integer >= 1, got 0" in result.output
    assert not (tmp_path / "r.sqlite").exists()


def test_without_the_ray_extra_workers_exit_2_with_the_install_line(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; "
            f"sys.argv = ['mergegate', 'evaluate', 'base={DEMO / 'models' / 'base'}', '--suite', "
            f"'{DEMO / 'suite.jsonl'}', '--registry', '{tmp_path / 'r.sqlite'}', '--workers', '2']; "
            "from mergegate.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "mergegate: evaluate: sharded evaluation (workers > 1 or a Ray address) needs the ray extra: "
        "pip install 'mergegate[ray]'"]
    assert not (tmp_path / "r.sqlite").exists()  # refused before the registry is touched
