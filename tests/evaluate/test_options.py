"""EvalOptions: one value holding an evaluation's settings, checked once when it is made, with the one device parser
merging uses too; the pipeline, the search and the runner take it instead of loose settings."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch

from mergegate import EvalOptions as Exported
from mergegate.engine import MergeOptions
from mergegate.errors import EvaluationError, MergeOptionsError, SearchError
from mergegate.evaluate import EvalOptions, evaluate_models
from mergegate.model_ref import EndpointSettings
from mergegate.pipeline import gate_release, release
from mergegate.search import SearchOptions, search


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, "batch size must be an integer >= 1, got 0"),
    ({"max_new_tokens": True}, "max new tokens must be an integer >= 1, got True"),
    ({"threads": 1.5}, "threads must be an integer >= 1, got 1.5"),
    ({"workers": "2"}, "workers must be an integer >= 1, got '2'"),
    ({"ray_address": " "}, "ray address must be a Ray cluster address"),
    ({"endpoint": EndpointSettings(retries=-1)}, "endpoint retries must be an integer in [0, 20], got -1"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_a_bad_setting_is_refused_when_the_options_are_made(settings, message):
    with pytest.raises(EvaluationError) as caught:
        EvalOptions(**settings)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(EvaluationError) as caught:
        EvalOptions(batch_size=0, max_new_tokens=0, endpoint=EndpointSettings(concurrency=0))
    assert str(caught.value) == ("evaluate: batch size must be an integer >= 1, got 0; max new tokens must be an "
                                 "integer >= 1, got 0; endpoint concurrency must be an integer >= 1, got 0")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU", 0, *([] if torch.cuda.is_available() else ["cuda"])])
def test_merging_and_evaluation_refuse_a_device_in_the_same_words(device):
    with pytest.raises(MergeOptionsError) as merging:
        MergeOptions(device=device)
    with pytest.raises(EvaluationError) as evaluating:
        EvalOptions(device=device)
    assert str(merging.value) == str(evaluating.value)


def test_the_options_are_public_and_travel_to_ray_workers_as_they_are():
    assert Exported is EvalOptions
    options = EvalOptions(batch_size=4, max_new_tokens=8, device="cpu", threads=1, progress=False)
    assert pickle.loads(pickle.dumps(options)) == options
    assert not EvalOptions().sharded and EvalOptions(workers=1).sharded is False
    assert EvalOptions().resolved_device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_pipeline_takes_one_value_per_kind_of_setting():
    """evaluate_models takes the options; release and gate_release take them as `eval` (release its merge's as
    `merge`), not the settings one by one."""
    assert list(inspect.signature(evaluate_models).parameters) == ["models", "suite", "registry", "options"]
    for function in (release, gate_release):
        parameters = inspect.signature(function).parameters
        assert "eval" in parameters and not {"batch_size", "device", "endpoint", "workers"} & set(parameters)
        assert len(parameters) <= 11
    assert "merge" in inspect.signature(release).parameters


def test_a_search_holds_the_evaluation_options_and_takes_their_fields_as_overrides(tmp_path):
    options = SearchOptions().replaced(trials=2, batch_size=8, progress=False)
    assert options.trials == 2 and options.eval == EvalOptions(batch_size=8, progress=False)
    with pytest.raises(EvaluationError, match="batch size must be an integer >= 1, got 0"):
        search(tmp_path / "space.yaml", tmp_path / "dev.jsonl", tmp_path / "held.jsonl", None, tmp_path / "out",
               batch_size=0)
    with pytest.raises(SearchError, match="trials run as Ray tasks"):
        search(tmp_path / "space.yaml", tmp_path / "dev.jsonl", tmp_path / "held.jsonl", None, tmp_path / "out",
               workers=2)
    assert not (tmp_path / "out").exists()
