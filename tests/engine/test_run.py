"""The engine end to end on real tiny Llama checkpoints."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from mergegate import merge, plan_merge
from mergegate.io.write import ShardedWriter

from .. import reference
from ..helpers import recipe_for

MODELS = ("ft1", "ft2", "ft3")


def _load(family, name):
    return load_file(family[name] / "model.safetensors")


def _expected(method: str, family) -> dict[str, torch.Tensor]:
    base = _load(family, "base")
    fts = [_load(family, m) for m in MODELS]
    weights = [1.0, 0.5, 0.8]
    out = {}
    for name, b in base.items():
        xs = [ft[name] for ft in fts]
        if method == "linear":
            out[name] = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
        elif method == "task_arithmetic":
            out[name] = reference.task_vectors(b, xs, weights, lam=0.7)
        elif method == "ties":
            masks = [reference.top_k_mask(x - b, 0.4) for x in xs]
            out[name] = reference.task_vectors(b, xs, weights, masks, consensus=True, normalize=True)
        elif method == "breadcrumbs":
            masks = [reference.crumbs_mask(x - b, 0.6, 0.05) for x in xs]
            out[name] = reference.task_vectors(b, xs, weights, masks)
        elif method == "slerp":
            out[name] = reference.slerp(0.3, b, xs[0])
    return out


PARAMS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.6, "gamma": 0.05},
}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs", "slerp"])
def test_each_method_equals_an_independent_computation(method, family, tmp_path):
    if method == "slerp":
        recipe = recipe_for("slerp", family, models=("ft1",), weights=[None], t=0.3)
        recipe["models"] = [{"model": str(family["ft1"])}]
    else:
        recipe = recipe_for(method, family, base=method != "linear", weights=[1.0, 0.5, 0.8], **PARAMS[method])
    merge(recipe, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = _expected(method, family)
    assert merged.keys() == expected.keys()
    worst = max(float((merged[n] - expected[n]).abs().max()) for n in merged)
    assert worst < 1e-5, f"{method}: max abs difference {worst}"


def test_merged_model_loads_and_generates(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge(recipe_for("ties", family, density=0.5), tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    inputs = tokenizer("merge", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert {"config.json", "generation_config.json", "tokenizer.json", "mergegate.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_rebuild_is_byte_identical_whatever_the_worker_count(method, family, tmp_path):
    recipe = recipe_for(method, family, density=0.5)
    merge(recipe, tmp_path / "a", workers=1, progress=False, seed=3)
    merge(recipe, tmp_path / "b", workers=3, progress=False, seed=3, memory_budget=1)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    merge(recipe, tmp_path / "c", workers=2, progress=False, seed=4)
    weights = lambda folder: _digests(folder)["model.safetensors"]  # noqa: E731  (mergegate.json records the seed)
    assert (weights(tmp_path / "c") != weights(tmp_path / "a")) == (method == "dare_ties")  # only random ones


def test_failure_mid_merge_leaves_nothing_at_out_dir(family, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ShardedWriter.write

    def failing_write(self, name, tensor, *rows):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError("disk full (injected)")
        return original(self, name, tensor, *rows)

    monkeypatch.setattr(ShardedWriter, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        merge(recipe_for("task_arithmetic", family), tmp_path / "out", progress=False)
    assert calls["n"] >= 6
    assert list(tmp_path.iterdir()) == []  # neither the model nor the staging folder


def test_existing_output_is_kept_unless_overwrite(family, tmp_path):
    from mergegate import MergegateError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergegateError, match="exists and is not empty.*--overwrite"):
        merge(recipe_for("linear", family, base=False), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge(recipe_for("linear", family, base=False), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_sharded_output_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    result = merge(recipe_for("linear", family, base=False), tmp_path / "out", shard_size="100KB", progress=False)
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in result.files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    merged_single = tmp_path / "single"
    merge(recipe_for("linear", family, base=False), merged_single, progress=False)
    single = load_file(merged_single / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in single:
            assert torch.equal(tensor, single[name]), name


def test_provenance_records_inputs_recipe_versions_and_outputs(family, tmp_path):
    result = merge(recipe_for("ties", family, density=0.5), tmp_path / "out", progress=False, seed=11)
    record = json.loads((tmp_path / "out" / "mergegate.json").read_text())
    assert record == result.provenance
    assert record["method"] == "ties" and record["seed"] == 11 and record["recipe"]["merge_method"] == "ties"
    weights = family["ft2"] / "model.safetensors"
    assert record["inputs"][str(family["ft2"])]["files"]["model.safetensors"] == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    for name, digest in record["outputs"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == digest
    assert {"torch", "safetensors", "mergegate", "python"} <= set(record["versions"])


def test_gradient_parameters_follow_layer_depth(family, tmp_path):
    recipe = recipe_for("task_arithmetic", family, models=("ft1",), weights=[[0.0, 1.0]])
    plan = plan_merge(recipe)
    by_name = {job.name: job for job in plan.jobs}
    assert by_name["model.layers.0.mlp.up_proj.weight"].per_model[0].weight == 0.0
    assert by_name["model.layers.1.mlp.up_proj.weight"].per_model[0].weight == 1.0
    assert by_name["model.embed_tokens.weight"].per_model[0].weight == 0.0  # outside the blocks t = 0
    merge(recipe, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, ft1 = _load(family, "base"), _load(family, "ft1")
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])


def test_missing_required_parameter_is_named_before_any_tensor(family, tmp_path):
    from mergegate import RecipeError

    recipe = recipe_for("ties", family)
    del recipe["models"][1]["parameters"]
    with pytest.raises(RecipeError, match=r"model '.*ft2': missing required parameter 'weight'"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bfloat16_inputs_with_dtype_and_out_dtype(family, tmp_path):
    recipe = recipe_for("task_arithmetic", family, models=("ft1", "ft2"))
    recipe.update(dtype="bfloat16", out_dtype="float16")
    merge(recipe, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    base, a, b = (_load(family, m) for m in ("base", "ft1", "ft2"))
    name = "model.layers.0.self_attn.q_proj.weight"
    rounded = [x[name].to(torch.bfloat16).float() for x in (base, a, b)]  # inputs rounded to `dtype` first
    expected = rounded[0] + (rounded[1] - rounded[0]) + (rounded[2] - rounded[0])
    assert torch.equal(merged[name], expected.to(torch.float16))


def test_recipe_paths_resolve_beside_the_recipe_file(family, tmp_path, write_recipe, monkeypatch):
    recipe = recipe_for("linear", family, base=False)
    for entry in recipe["models"]:
        entry["model"] = f"../{family['base'].parent.name}/{entry['model'].rsplit('/', 1)[1]}"
    path = family["base"].parent.parent / "recipes" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(recipe))
    monkeypatch.chdir(tmp_path)
    result = merge(path, tmp_path / "out", progress=False)
    assert result.tensors == len(_load(family, "base"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_methods_split_large_tensors_into_identical_chunks(method, family, tmp_path, monkeypatch):
    from mergegate.engine import plan as plan_module

    recipe = recipe_for(method, family, weights=[1.0, 0.5, 0.8], base=method != "linear")  # linear: an unlisted
    merge(recipe, tmp_path / "whole", progress=False)  # base would be a 4th input, without a weight
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1000)
    plan = plan_merge(recipe)
    assert len(plan.jobs) > 3 * len(plan.outputs) and {j.rows is not None for j in plan.jobs} == {True, False}
    merge(recipe, tmp_path / "chunked", progress=False, workers=3)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "chunked")


def test_input_hashes_are_cached_and_refreshed_when_a_file_changes(family, tmp_path, monkeypatch):
    import shutil

    from mergegate.io import hashing

    source = tmp_path / "ft"
    shutil.copytree(family["ft1"], source)
    recipe = recipe_for("task_arithmetic", {**family, "ft": source}, models=("ft",))
    weights = source / "model.safetensors"
    hashed = []  # the paths read to hash them (outputs are hashed too, always: they are new files)
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: hashed.append(path.resolve()) or real(path))
    merge(recipe, tmp_path / "a", progress=False)
    assert weights.resolve() in hashed
    hashed.clear()
    merge(recipe, tmp_path / "b", progress=False)
    assert weights.resolve() not in hashed  # cached: the file did not change
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: must be hashed again
    hashed.clear()
    record = merge(recipe, tmp_path / "c", progress=False).provenance
    assert weights.resolve() in hashed
    assert record["inputs"][str(source)]["files"]["model.safetensors"] == real(weights)


def test_a_fresh_merge_is_identified_without_reading_its_files_again(family, tmp_path, monkeypatch):
    from mergegate.io import hashing

    out = tmp_path / "merged"
    record = merge(recipe_for("linear", family, models=("ft1", "ft2"), base=False), out, progress=False).provenance
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    identity = hashing.folder_hash(out)
    assert hashed == []  # every output's digest was remembered under its final path when provenance was written
    assert {f.name for f in hashing.identity_files(out)} <= set(record["outputs"])
    monkeypatch.setenv("MERGEGATE_CACHE", str(tmp_path / "empty-cache"))
    assert hashing.folder_hash(out) == identity  # the same hash as reading every file


def test_slices_stack_layer_ranges_into_a_deeper_model(family, tmp_path):
    """Depth up-scaling: base layers 0-1 then ft1's layer 1 scaled; embeddings from the first slice, head from the last."""
    from transformers import AutoModelForCausalLM

    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["base"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(family["ft1"]), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]}
    merge(recipe, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(family["base"] / "model.safetensors")
    ft1 = load_file(family["ft1"] / "model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    for name in (n for n in base if ".layers." in n):
        assert torch.equal(out[name], base[name]), name
        deeper = name.replace(".layers.0.", ".layers.2.")
        if ".layers.0." in name:
            assert torch.equal(out[deeper], ft1[name.replace(".layers.0.", ".layers.1.")] * 0.5), deeper
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # the last slice's source parameters apply to the tensors after the blocks too (mergekit's scoping)
    assert torch.equal(out["lm_head.weight"], ft1["lm_head.weight"] * 0.5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 3


def test_slice_gradients_run_over_each_slice_and_sources_map_layers(family, tmp_path):
    """slerp inside a slice: t = [0, 1] interpolates over the slice's own layers, reading the sources' layers."""
    recipe = {"merge_method": "slerp", "base_model": str(family["base"]), "parameters": {"t": [0.0, 1.0]},
              "slices": [{"sources": [{"model": str(family["base"]), "layer_range": [0, 2]},
                                      {"model": str(family["ft2"]), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(family["base"]), "layer_range": [1, 2]},
                                      {"model": str(family["ft2"]), "layer_range": [0, 1]}]}]}
    merge(recipe, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(family["base"] / "model.safetensors")
    ft2 = load_file(family["ft2"] / "model.safetensors")
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[name.format(0)], base[name.format(0)])  # t = 0 at the slice's first layer
    assert torch.allclose(out[name.format(1)], ft2[name.format(1)], atol=1e-6)  # t = 1 at its last
    # a one-layer slice takes t = 1 (mergekit): its only layer is the other source's layer 0
    assert torch.allclose(out[name.format(2)], ft2[name.format(0)], atol=1e-6)


def test_slices_refuse_unequal_ranges_and_missing_layers(family, tmp_path):
    from mergegate.errors import IncompatibleModels, RecipeError

    uneven = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(family["base"]), "layer_range": [0, 2]}, {"model": str(family["ft1"]), "layer_range": [0, 1]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]: every source must span the same number of layers"):
        plan_merge(uneven)
    too_deep = {"merge_method": "passthrough", "slices": [{"sources": [
        {"model": str(family["base"]), "layer_range": [1, 3]}]}]}
    with pytest.raises(IncompatibleModels, match=r"has no tensor 'model.layers.2\..*"):
        plan_merge(too_deep)


def test_model_plus_adapter_folds_the_lora_in_once(tmp_path, monkeypatch):
    """`base+adapter` (mergekit's spelling) merges the PEFT adapter into the base, cached by content."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MERGEGATE_CACHE", str(tmp_path / "cache"))
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models"
    folded_ref = f"{demo / 'base'}+{demo / 'arithmetic_lora'}"
    recipe = {"merge_method": "task_arithmetic", "base_model": str(demo / "base"),
              "models": [{"model": str(demo / "tool_required"), "parameters": {"weight": 1.0}},
                         {"model": folded_ref, "parameters": {"weight": 1.0}}]}
    merge(recipe, tmp_path / "out", progress=False)
    folded = plan_merge(recipe).checkpoints[folded_ref].path
    first_build = (folded / "model.safetensors").stat().st_mtime_ns
    merge(recipe, tmp_path / "again", progress=False, overwrite=True)
    assert (folded / "model.safetensors").stat().st_mtime_ns == first_build  # reused, not rebuilt

    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo / "base"),
                                            demo / "arithmetic_lora").merge_and_unload().state_dict()
    base, tool, out = (load_file(demo / "base" / "model.safetensors"),
                       load_file(demo / "tool_required" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = tool[name] + peft_merged[name] - base[name]  # task arithmetic of the two deltas
    worst = (out[name] - expected).abs().max().item()
    assert worst < 1e-5, f"max abs diff {worst:.3g} vs PEFT's merge_and_unload"
    assert not torch.equal(peft_merged[name], base[name])  # the adapter does target this weight


# ------------------------------------------------------------------ staging left behind by killed processes

_SLOW_MERGE = """
import sys, time
import mergegate.engine.run as run

original = run._compute

def slow(*args):  # a merge that has written something and then takes its time
    original(*args)
    time.sleep(120)

run._compute = slow
run.merge(sys.argv[1], sys.argv[2], progress=False, workers=1)
"""


def _partials(parent):
    return sorted(p.name for p in parent.iterdir() if ".mergegate-" in p.name)


@pytest.mark.slow
def test_staging_of_a_killed_merge_is_removed_by_the_next_merge_into_that_folder(family, tmp_path, write_recipe):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(recipe_for("linear", family, base=False))
    parent = tmp_path / "outputs"
    parent.mkdir()
    script = tmp_path / "slow_merge.py"
    script.write_text(_SLOW_MERGE)
    victim = subprocess.Popen([sys.executable, str(script), str(recipe), str(parent / "a")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    staging = parent / f".a.mergegate-partial-{victim.pid}"
    try:
        deadline = time.monotonic() + 120
        while not (staging / "model.safetensors").exists():
            assert victim.poll() is None, "the merge ended before it could be killed"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.05)
        # a merge running beside it must leave its staging alone: its writer is alive
        merge(recipe_for("linear", family, base=False), parent / "b", progress=False)
        assert staging.is_dir()
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert staging.is_dir() and (staging / "model.safetensors").stat().st_size > 0  # SIGKILL: nothing cleaned up
    assert not (parent / "a").exists()
    merge(recipe_for("linear", family, base=False), parent / "c", progress=False)  # any output in that folder
    assert _partials(parent) == []
    assert sorted(p.name for p in parent.iterdir()) == ["b", "c"]


def test_stale_staging_folders_from_dead_pids_are_removed(family, tmp_path):
    import subprocess

    from mergegate._staging import remove_stale_partials

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".old.mergegate-partial-{dead.pid}", tmp_path / ".older.mergegate-partial",
             tmp_path / f".mergegate-new-{dead.pid}-x1y2"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(1024))
    alive = tmp_path / ".live.mergegate-partial-1"  # pid 1 is always alive
    alive.mkdir()
    unrelated = tmp_path / ".mergegate-partial-notes"
    unrelated.mkdir()
    merge(recipe_for("linear", family, base=False), tmp_path / "out", progress=False)
    assert not any(folder.exists() for folder in stale)
    assert alive.is_dir() and unrelated.is_dir()
    assert remove_stale_partials(tmp_path) == []


def test_output_that_cannot_be_created_is_refused_before_any_work(family, tmp_path):
    from mergegate import MergegateError

    (tmp_path / "some_file").write_text("x")
    with pytest.raises(MergegateError, match=r"some_file/out: cannot be created: .*some_file is not a folder"):
        merge(recipe_for("linear", family, base=False), tmp_path / "some_file" / "out", progress=False)
    with pytest.raises(MergegateError, match=r"cannot be created: .*some_file is not a folder"):
        merge(recipe_for("linear", family, base=False), tmp_path / "some_file" / "deeper" / "out", progress=False)


@pytest.mark.parametrize("options, message", [
    ({"workers": -1}, "workers must be a whole number of at least 1, got -1"),
    ({"workers": 0}, "workers must be a whole number of at least 1, got 0"),
    ({"shard_size": "9" * 400}, "shard size: size '9999.*' is too large"),
    ({"shard_size": "0"}, "shard size: size '0' is not positive"),
])
def test_bad_options_are_refused(family, tmp_path, options, message):
    from mergegate import MergegateError

    with pytest.raises(MergegateError, match=message):
        merge(recipe_for("linear", family, base=False), tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_parameters_that_overflow_are_refused_not_written_as_inf(family, tmp_path):
    from mergegate import MergegateError

    recipe = recipe_for("linear", family, base=False, weights=[3e38, 3e38, 3e38], normalize=False)
    with pytest.raises(MergegateError, match=r"tensor '.*': the merge gives NaN or infinite values from finite inputs"):
        merge(recipe, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false here)")
@pytest.mark.parametrize("method, parameters", [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
    ("slerp", {"t": 0.3}),
])
def test_a_merge_on_cuda_matches_the_cpu(family, tmp_path, method, parameters):
    """Chunks moved to the GPU and back: elementwise methods give the CPU's bytes (DARE's draws stay on the
    CPU generator); slerp's norms are reductions and may differ in the last bits."""
    models = ("ft1",) if method == "slerp" else ("ft1", "ft2", "ft3")
    recipe = recipe_for(method, family, models=models, **parameters)
    if method == "slerp":
        recipe["models"] = [{"model": str(family["base"])}, {"model": str(family["ft1"])}]
    cpu = merge(recipe, tmp_path / "cpu", progress=False, seed=3)
    cuda = merge(recipe, tmp_path / "cuda", progress=False, seed=3, device="cuda")
    expected, found = load_file(cpu.out_dir / "model.safetensors"), load_file(cuda.out_dir / "model.safetensors")
    assert expected.keys() == found.keys()
    for name, tensor in expected.items():
        if method == "slerp":
            torch.testing.assert_close(found[name], tensor, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(found[name], tensor), name
