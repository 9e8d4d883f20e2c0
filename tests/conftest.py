"""Shared fixtures: tiny Llama checkpoints built with transformers in a temp dir (fixed seeds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory):
    """Keep the input-hash cache out of the user's home during tests."""
    os.environ["MERGEGATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_when_marked(request):
    """Modules marked `pytestmark = pytest.mark.one_torch_thread` (tiny SVDs, matmuls, forward passes) run with one
    intra-op thread, module fixtures included: on a shared 2-core machine a second thread only adds contention."""
    if request.node.get_closest_marker("one_torch_thread") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for one test module (sharded evaluation, search trials), stopped after it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base LlamaForCausalLM (hidden 64, 2 layers) and three fine-tunes = base + small seeded deltas."""
    from mergegate.demo.samples import write_family

    return write_family(tmp_path_factory.mktemp("family"), finetunes=3)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict to YAML and return its path."""

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def write_jsonl(path: Path, rows) -> Path:
    """Rows as a JSONL suite file (one JSON object a line); returns the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_for(method: str, family: dict[str, Path], models=("ft1", "ft2", "ft3"), base=True, **parameters) -> dict:
    weights = parameters.pop("weights", [1.0] * len(models))
    recipe = {
        "merge_method": method,
        "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in zip(models, weights)],
    }
    if base:
        recipe["base_model"] = str(family["base"])
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def assert_refused(result, *fragments: str) -> None:
    """A refusal as a user sees it: exit 2, exactly one `mergegate: ...` line on stderr naming each fragment, no
    traceback. `result` is a typer CliRunner result or a finished subprocess."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + (getattr(result, "output", "") or "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergegate: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
