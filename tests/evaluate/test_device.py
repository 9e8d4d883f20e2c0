"""The `device` setting: checked values, the default, dtype in the cache key, `--device` on the CLI; and, where a
GPU is present, generation and the gateway's local backend on CUDA (skipped with the reason otherwise)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

import mergegate.gateway
from mergegate.cli import app
from mergegate.errors import EvaluationError
from mergegate.evaluate import EvalOptions, evaluate_models, load_suite
from mergegate.evaluate.local import device_dtype, load_model, run_config
from mergegate.evaluate.runner import config_hash
from mergegate.model_ref import ModelRef
from mergegate.registry import Registry

from ..helpers import assert_refused, write_jsonl

pytestmark = pytest.mark.one_torch_thread

ROWS = [{"id": f"r{i}", "cohort": "echo" if i % 2 else "json_output", "prompt": f"say {i}:", "expected": str(i),
         "evaluators": ["exact_match"] if i % 2 else ["json_valid", "perplexity"]} for i in range(4)]
NO_GPU = "no CUDA GPU on this machine (torch.cuda.is_available() is false)"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.fixture
def suite_file(tmp_path):
    return write_jsonl(tmp_path / "suite.jsonl", ROWS)


@pytest.fixture
def no_gpu(monkeypatch):
    """As on a machine without a GPU, wherever the tests run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)





def test_the_default_is_cpu_without_a_gpu_and_cpu_is_always_accepted(no_gpu):
    assert EvalOptions().resolved_device == "cpu" and EvalOptions(device="cpu").resolved_device == "cpu"
    assert device_dtype("cpu") == torch.float32 and device_dtype("cuda:1") == torch.bfloat16


@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "mps", "", 0])
def test_malformed_devices_are_refused_naming_the_accepted_forms(value):
    with pytest.raises(EvaluationError, match="device must be cpu, cuda or cuda:N"):
        EvalOptions(device=value)


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_isassert_refused(no_gpu, value):
    with pytest.raises(EvaluationError, match=f"device '{value}': no CUDA GPU is available"):
        EvalOptions(device=value)


def test_the_cache_key_follows_the_devices_dtype(family, suite_file):
    ref, suite = ModelRef("base", family["base"]), load_suite(suite_file)
    cpu = run_config(ref, suite, max_new_tokens=8)
    assert cpu == run_config(ref, suite, max_new_tokens=8, device="cpu")
    assert cpu["generation"]["dtype"] == "float32" and "device" not in cpu["generation"]  # the key CPU runs had
    cuda = run_config(ref, suite, max_new_tokens=8, device="cuda")
    assert cuda["generation"]["dtype"] == "bfloat16" and cuda["generation"]["device"] == "cuda"
    assert config_hash(cpu) != config_hash(cuda)
    assert run_config(ref, suite, max_new_tokens=8, device="cuda:1") == cuda  # the GPU's index is no answer's


def test_evaluate_with_device_cpu_runs_in_float32(family, suite_file, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", f"base={family['base']}", "--suite", str(suite_file),
                                      "--registry", str(tmp_path / "r.sqlite"), "--max-new-tokens", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (config,), = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT config FROM eval_runs").fetchall()
    assert json.loads(config)["generation"]["dtype"] == "float32"


def test_evaluate_gate_and_release_refuse_cuda_without_a_gpu(no_gpu, family, suite_file, tmp_path, write_recipe):
    from ..helpers import recipe_for

    registry = tmp_path / "r.sqlite"
    assert_refused(CliRunner().invoke(app, ["evaluate", f"base={family['base']}", "--suite", str(suite_file),
                                      "--registry", str(registry), "--device", "cuda"]),
             "device 'cuda': no CUDA GPU is available")
    assert_refused(CliRunner().invoke(app, ["gate", "--candidate", f"cand={family['ft1']}", "--base",
                                      f"base={family['base']}", "--source", f"src={family['ft2']}", "--suite",
                                      str(suite_file), "--out", str(tmp_path / "out"), "--registry", str(registry),
                                      "--device", "cuda"]),
             "device 'cuda'")
    recipe = write_recipe(recipe_for("task_arithmetic", family, models=("ft1", "ft2")))
    assert_refused(CliRunner().invoke(app, ["release", str(recipe), "--suite", str(suite_file), "--out",
                                      str(tmp_path / "rel"), "--device", "cuda:0"]),
             "device 'cuda:0'")
    assert not registry.exists() and not (tmp_path / "out").exists() and not (tmp_path / "rel").exists()





def test_serve_passes_the_device_and_refuses_cuda_without_a_gpu(no_gpu, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(mergegate.gateway, "serve", lambda plan, **kw: seen.update(plan=plan, **kw))
    plan = tmp_path / "rollout.yaml"
    result = CliRunner().invoke(app, ["serve", str(plan), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["config"].device == "cpu"
    seen.clear()
    assert_refused(CliRunner().invoke(app, ["serve", str(plan), "--device", "cuda"]), "device 'cuda'")
    assert not seen


# -- on a GPU -------------------------------------------------------------------------------------------------
@needs_gpu
def test_generation_on_cuda_is_bf16_greedy_and_repeatable(family, suite_file, tmp_path):
    model, tokenizer = load_model(ModelRef("base", family["base"]), "cuda")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    suite, registry = load_suite(suite_file), Registry(tmp_path / "r.sqlite")
    first = evaluate_models([(ModelRef("base", family["base"]), "source")], suite, registry,
                            EvalOptions(batch_size=4, max_new_tokens=4, device="cuda"))["base"]
    again = evaluate_models([(ModelRef("base", family["base"]), "source")], suite, registry,
                            EvalOptions(batch_size=1, max_new_tokens=4, device="cuda", force=True))["base"]
    assert [r.row_id for r in first.results] == [row["id"] for row in ROWS]
    assert all(1 <= r.completion_tokens <= 4 for r in first.results)
    assert [r.output for r in first.results] == [r.output for r in again.results]  # batched = one by one
    config = registry.run_config(first.run_id)
    assert config["generation"]["dtype"] == "bfloat16" and config["generation"]["device"] == "cuda"
    # greedy: the first new token is the argmax of the prompt's last logits
    encoded = tokenizer(ROWS[0]["prompt"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**encoded).logits[0, -1]
        generated = model.generate(**encoded, max_new_tokens=1, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    assert int(generated[0, -1]) == int(logits.argmax())


@needs_gpu
def test_the_gateway_local_backend_serves_from_cuda(family):
    from mergegate.gateway.backends import LocalBackend
    from mergegate.gateway.protocol import GenParams, GenRequest

    async def run():
        backend = LocalBackend("base", family["base"], device="cuda")
        await backend.start()
        try:
            assert backend.model.device.type == "cuda" and backend.describe()["device"].startswith("cuda")
            done = await backend.generate(GenRequest("chat", GenParams(max_tokens=3),
                                                     messages=({"role": "user", "content": "hi"},)))
            assert 1 <= done.completion_tokens <= 3 and done.finish_reason in ("stop", "length")
        finally:
            await backend.close()

    asyncio.run(run())
