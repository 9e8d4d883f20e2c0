"""Evaluation through an OpenAI-compatible server (evaluate.endpoint): the same answers as in-process, the same
cache rules (keyed by what the server reports for the model), retries that honour Retry-After, perplexity
refused, and `mergegate gate` with a url candidate. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.endpoint import EndpointSettings
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

from .helpers import tiny_suite

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
FAST = EndpointSettings(concurrency=4, timeout_s=30, retries=2, backoff_s=0.05)


@pytest.mark.slow
def test_gateway_answers_as_in_process_and_second_run_is_cached(gateway, demo_suite, tmp_path):
    suite = load_suite(demo_suite)
    registry = Registry(tmp_path / "r.sqlite")
    local = ModelRef("local", DEMO / "models" / "json_output")
    remote = ModelRef("remote", url=gateway, served_model="json_output")
    # max_new_tokens 8 is below every row's 2*expected+8 budget, so both runners cut at 8 tokens (budgets counted
    # by the gateway's /tokenize: tests/gateway/test_tokenize.py).
    runs = evaluate_models([(local, "source"), (remote, "candidate")], suite, registry,
                           EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST))
    mine, theirs = runs["local"].results, runs["remote"].results
    assert [r.row_id for r in mine] == [r.row_id for r in theirs]
    assert [r.output for r in mine] == [r.output for r in theirs]
    assert [r.score for r in mine] == [r.score for r in theirs]
    assert [r.prompt_tokens for r in mine] == [r.prompt_tokens for r in theirs]
    assert [r.completion_tokens for r in mine] == [r.completion_tokens for r in theirs]
    assert all(r.latency_ms > 0 for r in theirs)
    assert registry.model(runs["remote"].model_hash)["path"] == gateway
    again = evaluate_models([(remote, "candidate")], suite, registry,
                            EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST))
    assert again["remote"].cached and [r.output for r in again["remote"].results] == [r.output for r in theirs]


@pytest.mark.slow
def test_429_with_retry_after_is_retried(scripted, tmp_path):
    scripted.busy = 1
    ref = ModelRef("m", url=scripted.url)
    runs = evaluate_models([(ref, "candidate")], tiny_suite(tmp_path), Registry(tmp_path / "r.sqlite"),
                           EvalOptions(progress=False, endpoint=FAST))
    (result,) = runs["m"].results
    assert scripted.calls == 2 and result.passed and result.output == "42"
    assert result.latency_ms >= 300  # the wait Retry-After asked for is part of the row's wall time
    assert (result.prompt_tokens, result.completion_tokens) == (3, 1)


@pytest.mark.slow
def test_a_server_reporting_another_identity_is_another_model(scripted, tmp_path):
    suite, registry = tiny_suite(tmp_path), Registry(tmp_path / "r.sqlite")
    ref = ModelRef("m", url=scripted.url)

    def run():
        return evaluate_models([(ref, "candidate")], suite, registry, EvalOptions(progress=False, endpoint=FAST))["m"]

    first = run()
    scripted.identity["created"] = 2  # vLLM stamps `created` per call: not part of the identity
    assert run().cached
    scripted.identity["fingerprint"] = "b"
    changed = run()
    assert not changed.cached and changed.model_hash != first.model_hash
    assert scripted.calls == 2


def test_perplexity_rows_are_refused_for_a_url_model(tmp_path):
    suite = tiny_suite(tmp_path, ("exact_match", "perplexity"))
    with pytest.raises(EvaluationError, match="'perplexity' needs the likelihood"):
        evaluate_models([(ModelRef("m", url="http://127.0.0.1:9/v1"), "candidate")], suite,
                        Registry(tmp_path / "r.sqlite"), EvalOptions(progress=False))


def test_bad_endpoint_settings_are_refused(tmp_path):
    with pytest.raises(EvaluationError, match="endpoint concurrency"):
        evaluate_models([(ModelRef("m", url="http://127.0.0.1:9/v1"), "candidate")], tiny_suite(tmp_path),
                        Registry(tmp_path / "r.sqlite"),
                        EvalOptions(progress=False, endpoint=EndpointSettings(concurrency=0)))


@pytest.mark.slow
def test_gate_cli_with_a_url_candidate(gateway, demo_suite, tmp_path):
    from mergegate.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "gate", "--candidate", f"x={gateway}#json_output", "--base", f"base={DEMO / 'models' / 'base'}",
        "--source", f"json_output={DEMO / 'models' / 'json_output'}", "--suite", str(demo_suite),
        "--out", str(out), "--registry", str(tmp_path / "r.sqlite"), "--max-new-tokens", "8"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "report.md").is_file()
    plan = yaml.safe_load((out / "rollout.yaml").read_text())
    assert plan["models"]["x"]["url"] == gateway and plan["models"]["x"]["upstream_model"] == "json_output"


@pytest.mark.slow
def test_a_folder_re_merged_in_place_is_not_served_from_the_cache(demo_suite, tmp_path):
    """The gateway reports each local model's content fingerprint, and the router model a digest of the plan: a
    folder whose files change under the same served name is a new model to the cache, never stale scores."""
    import shutil

    from mergegate.gateway import create_app
    from mergegate.gateway.testing import ServerThread
    from mergegate.rollout import RolloutPlan

    folder = tmp_path / "candidate"
    shutil.copytree(DEMO / "models" / "json_output", folder)
    plan = RolloutPlan.model_validate({"candidate": "candidate", "models": {
        "candidate": {"role": "candidate", "path": str(folder)}}, "routes": {}, "default": {"model": "candidate"}})
    suite = load_suite(demo_suite)
    registry = Registry(tmp_path / "r.sqlite")

    def evaluate(served: str):
        app = create_app(plan, registry=Registry(tmp_path / "gateway.sqlite"))
        with ServerThread(app) as server:
            ref = ModelRef("candidate", url=server.url + "/v1", served_model=served)
            return evaluate_models([(ref, "candidate")], suite, registry,
                                   EvalOptions(max_new_tokens=8, progress=False, endpoint=FAST))["candidate"]

    first, router_first = evaluate("candidate"), evaluate("mergegate")
    assert evaluate("candidate").cached and evaluate("mergegate").cached  # unchanged: served from the cache
    shutil.rmtree(folder)
    shutil.copytree(DEMO / "models" / "tool_required", folder)  # re-merged in place: other weights, same name
    second, router_second = evaluate("candidate"), evaluate("mergegate")
    assert not second.cached and second.model_hash != first.model_hash
    assert not router_second.cached and router_second.model_hash != router_first.model_hash
    assert [r.output for r in second.results] != [r.output for r in first.results]
