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


# -- servers that evaluations talk to (127.0.0.1 only) ---------------------------------------------------------

@pytest.fixture(scope="module")
def demo_suite(tmp_path_factory):
    """The demo suite without its perplexity rows, two rows a cohort (`evaluate.helpers.demo_rows`)."""
    from .evaluate.helpers import demo_rows

    path = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows()))
    return path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The project's gateway serving the demo json_output model (one-model plan); its /v1 url."""
    from mergegate.gateway import create_app
    from mergegate.gateway.testing import ServerThread
    from mergegate.registry import Registry
    from mergegate.rollout import RolloutPlan

    from .evaluate.helpers import DEMO

    folder = tmp_path_factory.mktemp("gateway")
    plan = RolloutPlan.model_validate({"candidate": "json_output", "models": {
        "json_output": {"role": "candidate", "path": str(DEMO / "models" / "json_output")}},
        "routes": {}, "default": {"model": "json_output"}})
    app = create_app(plan, registry=Registry(folder / "gateway.sqlite"))
    with ServerThread(app) as server:
        yield server.url + "/v1"


@pytest.fixture
def scripted():
    """A running `evaluate.helpers.Scripted` server, its /v1 url as `.url`."""
    from mergegate.gateway.testing import ServerThread

    from .evaluate.helpers import Scripted

    server = Scripted()
    with ServerThread(server.app) as running:
        server.url = running.url + "/v1"
        yield server
