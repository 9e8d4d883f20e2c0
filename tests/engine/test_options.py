"""MergeOptions: one checked value for a merge run, taken by merge, run_merge, release and the CLI."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import mergegate
from mergegate.engine import MergeOptions, merge
from mergegate.errors import MergegateError, MergeOptionsError
from mergegate.evaluate import EvalOptions

from ..helpers import recipe_for


def test_defaults_are_the_engines():
    assert MergeOptions() == MergeOptions(workers=None, memory_budget=2 * 1024**3, shard_size="5GB", seed=0,
                                          allow_pickle=False, overwrite=False, progress=None, check_lineage=True,
                                          device="cpu")
    assert mergegate.MergeOptions is MergeOptions


@pytest.mark.parametrize("fields, option, message", [
    ({"workers": 0}, "workers", "workers must be a whole number of at least 1, got 0"),
    ({"workers": True}, "workers", "workers must be a whole number of at least 1, got True"),
    ({"workers": 2.0}, "workers", "workers must be a whole number of at least 1, got 2.0"),
    ({"shard_size": "big"}, "shard_size", "shard size: not a size: 'big'"),
    ({"shard_size": 0}, "shard_size", "shard size: "),
    ({"device": "tpu"}, "device", "device must be cpu, cuda or cuda:N, got 'tpu'"),
    ({"device": 0}, "device", "device must be cpu, cuda or cuda:N, got 0"),
    *([({"device": "cuda"}, "device", r"no CUDA GPU is available to torch here")]
      if not torch.cuda.is_available() else [({"device": "cuda:99"}, "device", "torch sees")]),
])
def test_bad_options_are_refused_when_made_naming_the_field(fields, option, message):
    with pytest.raises(MergeOptionsError, match=message) as refused:
        MergeOptions(**fields)
    assert refused.value.option == option and isinstance(refused.value, MergegateError)
    assert str(refused.value) == option.replace("_", " ") + refused.value.problem
    again = pickle.loads(pickle.dumps(refused.value))
    assert (again.option, again.problem, str(again)) == (option, refused.value.problem, str(refused.value))


def test_options_and_overrides_are_one_set_of_fields(family, tmp_path):
    recipe = recipe_for("dare_ties", family, density=0.5)
    merge(recipe, tmp_path / "keywords", progress=False, seed=3, workers=2, shard_size="100KB")
    merge(recipe, tmp_path / "options", MergeOptions(progress=False, seed=3, workers=2, shard_size="100KB"))
    merge(recipe, tmp_path / "both", MergeOptions(progress=False, seed=9, workers=1), seed=3, shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "keywords").iterdir())
    assert sum(name.endswith(".safetensors") for name in files) > 1  # the shard size reached the writer
    for other in ("options", "both"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == files
        for name in files:
            if name.endswith(".safetensors"):
                ours, theirs = load_file(tmp_path / "keywords" / name), load_file(tmp_path / other / name)
                assert all(ours[k].equal(theirs[k]) for k in ours), (other, name)
    with pytest.raises(MergeOptionsError, match="workers must be a whole number"):
        merge(recipe, tmp_path / "bad", MergeOptions(progress=False), workers=0)  # overrides are checked too
    with pytest.raises(TypeError):
        merge(recipe, tmp_path / "bad", progress=False, shardsize="1GB")
    assert not (tmp_path / "bad").exists()


def test_release_passes_every_merge_option_and_owns_its_candidate_folder(family, tmp_path, monkeypatch):
    import mergegate.pipeline as release_module

    given = []

    class Stop(Exception):
        pass

    def fake_merge(recipe, out_dir, options=None, **overrides):
        given.append((out_dir, options, overrides))
        raise Stop

    monkeypatch.setattr(release_module, "merge", fake_merge)
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"id": "a", "cohort": "c", "prompt": "p", "expected": "x", "evaluators": ["exact_match"]}\n')
    options = MergeOptions(workers=1, memory_budget=10**6, shard_size="1MB", seed=7, allow_pickle=True,
                           progress=False, check_lineage=False)
    recipe = recipe_for("ties", family, density=0.5)
    with pytest.raises(Stop):
        release_module.release(recipe, suite, None, tmp_path / "out", eval=EvalOptions(progress=True), merge=options)
    with pytest.raises(Stop):
        release_module.release(recipe, suite, None, tmp_path / "out", eval=EvalOptions(progress=False))
    assert given == [(tmp_path / "out" / "candidate", replace(options, overwrite=True), {}),
                     (tmp_path / "out" / "candidate", MergeOptions(progress=False, overwrite=True), {})]
