"""Adapter routes on a shared base: a plan declares a base once and adapters on it; the gateway loads the base
once and applies each request's adapter, answering as the separate `base+adapter` models do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergegate.errors import PlanError
from mergegate.evaluate.adapters import held_parameter_bytes
from mergegate.rollout import RolloutPlan, load_plan

from ..helpers import make_lora

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models"
PROMPTS = ["33+41=", "12+7=", "json: name=ada\n", "what is the weather in Paris?"]


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory) -> Path:
    return make_lora(DEMO / "base", tmp_path_factory.mktemp("lora") / "noisy", seed=7)


def shared_plan(noisy: Path) -> dict:
    """The two adapters on one declared base, the base alone, and the same adapters as separate models."""
    base, arithmetic = str(DEMO / "base"), str(DEMO / "arithmetic_lora")
    return {"candidate": "arithmetic", "bases": {"demo": {"path": base}},
            "models": {"arithmetic": {"base": "demo", "adapter": arithmetic},
                       "noisy": {"base": "demo", "adapter": str(noisy)},
                       "plain": {"role": "base", "base": "demo"},
                       "arithmetic_full": {"path": base, "adapter": arithmetic},
                       "noisy_full": {"path": base, "adapter": str(noisy)},
                       "plain_full": {"path": base}},
            "routes": {"arithmetic": {"model": "arithmetic", "fallback": ["plain"]},
                       "noisy": {"model": "noisy"}},
            "default": {"model": "plain"}}


@pytest.mark.slow
def test_adapter_routes_answer_as_the_separate_models_with_the_base_loaded_once(launch, second_adapter):
    running = launch(shared_plan(second_adapter))
    client = running.client()

    def answer(model: str, prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    answers = {}
    for shared, full in [("arithmetic", "arithmetic_full"), ("noisy", "noisy_full"), ("plain", "plain_full")]:
        for prompt in PROMPTS:
            answers[shared, prompt] = answer(shared, prompt)
            assert answers[shared, prompt] == answer(full, prompt), (shared, prompt)
    # the adapters do change answers: each one differs from the base somewhere
    for adapter in ("arithmetic", "noisy"):
        assert any(answers[adapter, p] != answers["plain", p] for p in PROMPTS), adapter
    # a cohort's route answers with its adapter
    routed = client.completions.create(model="mergegate", prompt="33+41=", max_tokens=12, temperature=0,
                                       extra_headers={"X-Cohort": "noisy"})
    assert routed.choices[0].text == answers["noisy", "33+41="]

    # concurrent requests on different adapters each get their own adapter (one generation at a time on the base)
    from concurrent.futures import ThreadPoolExecutor

    asked = [(model, prompt) for prompt in PROMPTS for model in ("arithmetic", "noisy", "plain")] * 2
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda pair: answer(*pair), asked))
    assert got == [answers[pair] for pair in asked]

    backends = running.gateway.backends
    views = [backends[name] for name in ("arithmetic", "noisy", "plain")]
    shared = views[0].shared
    assert all(view.shared is shared and view.model is shared.model for view in views)
    assert shared.loads == 1
    separate = held_parameter_bytes(backends["plain_full"].model)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in shared.model.named_parameters() if "lora_" in n)
    # the views together hold one base and the adapters' LoRA matrices, not a base per adapter
    assert held_parameter_bytes(*(view.model for view in views)) == separate + lora_bytes
    assert 0 < lora_bytes < separate / 2


def test_a_plan_declares_a_base_once_and_names_it_per_model(tmp_path, second_adapter):
    plan = RolloutPlan.model_validate(shared_plan(second_adapter))
    ref = plan.model_ref("noisy")
    assert (ref.path, ref.adapter) == (DEMO / "base", second_adapter)
    assert plan.model_ref("plain").adapter is None
    saved = plan.save(tmp_path / "rollout.yaml")
    assert load_plan(saved).model_ref("arithmetic") == plan.model_ref("arithmetic")
    assert "bases" in yaml.safe_load(saved.read_text())


def test_a_plan_without_bases_is_written_without_them(tmp_path):
    plan = RolloutPlan.model_validate({"candidate": "b", "models": {"b": {"path": str(DEMO / "base")}},
                                       "routes": {}, "default": {"model": "b"}})
    assert "bases" not in plan.save(tmp_path / "rollout.yaml").read_text()


def test_a_url_base_serves_lora_modules_by_name():
    """vLLM `serve BASE --enable-lora --lora-modules arithmetic=PATH`: the adapter is the model name sent."""
    plan = RolloutPlan.model_validate({
        "candidate": "arithmetic",
        "bases": {"vllm": {"url": "http://127.0.0.1:8000/v1", "upstream_model": "smol", "api_key_env": "VLLM_KEY"}},
        "models": {"arithmetic": {"base": "vllm", "adapter": "arithmetic"}, "plain": {"base": "vllm"}},
        "routes": {}, "default": {"model": "arithmetic"}})
    ref = plan.model_ref("arithmetic")
    assert (ref.url, ref.served_model, ref.endpoint.api_key_env) == ("http://127.0.0.1:8000/v1", "arithmetic",
                                                                     "VLLM_KEY")
    assert plan.model_ref("plain").served_model == "smol"


@pytest.mark.parametrize(("change", "named"), [
    ({"models": {"a": {"base": "nowhere", "adapter": "x"}}}, "models.a.base: 'nowhere' is not among bases"),
    ({"models": {"a": {"base": "demo", "path": "/tmp"}}}, "takes its location from the base: no path"),
    ({"bases": {"demo": {"path": "/tmp", "url": "http://127.0.0.1:1/v1"}}}, "exactly one of 'path' or 'url'"),
    ({"bases": {"demo": {"path": "/tmp", "upstream_model": "m"}}}, "apply to a 'url'"),
])
def test_a_wrong_base_is_refused_naming_the_field(tmp_path, change, named):
    plan = {"candidate": "a", "bases": {"demo": {"path": str(DEMO / "base")}},
            "models": {"a": {"base": "demo"}}, "routes": {}, "default": {"model": "a"}}
    plan.update(change)
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanError, match=named.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as err:
        load_plan(path)
    assert "\n" not in str(err.value)


def test_a_missing_base_folder_is_refused_naming_the_base(tmp_path):
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump({"candidate": "a", "bases": {"demo": {"path": "no/such"}},
                                    "models": {"a": {"base": "demo"}}, "routes": {}, "default": {"model": "a"}}))
    with pytest.raises(PlanError, match="base 'demo' path .* is not a folder"):
        load_plan(path)


@pytest.mark.slow
def test_a_saved_router_serves_each_request_with_the_adapter_it_picks(launch, second_adapter, tmp_path_factory):
    from mergegate.evaluate.adapters import load_shared, train_router

    adapters = {"arithmetic": DEMO / "arithmetic_lora", "noisy": second_adapter}
    model, tokenizer = load_shared(DEMO / "base", adapters)
    router = train_router(model, tokenizer, DEMO / "base", adapters, {"arithmetic": "arithmetic", "json_output": "noisy"},
                          DEMO.parent / "calibration.jsonl")
    folder = router.save(tmp_path_factory.mktemp("router") / "router")
    plan = shared_plan(second_adapter)
    plan["models"]["gated"] = {"base": "demo", "router": str(folder)}
    running = launch(plan)
    client = running.client()

    def answer(model: str, prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    # arithmetic to its adapter, JSON to the noisy one, the rest to the base alone: as the calibration rows taught it
    for prompt, expected in [("33+41=", "arithmetic"), ("json: name=ada, city=lima\n", "noisy"),
                             ("what is the weather in Paris?", "plain")]:
        assert answer("gated", prompt) == answer(expected, prompt), prompt
    shared = running.gateway.backends["gated"].shared
    assert shared.loads == 1 and len(shared.adapters) == 2  # the router's adapters are the plan's, loaded once


def test_a_router_on_a_url_base_or_beside_an_adapter_is_refused():
    base = {"candidate": "g", "models": {"g": {"base": "b", "router": "r"}}, "routes": {}, "default": {"model": "g"}}
    with pytest.raises(ValueError, match="models.g.router: a router picks among adapters on a local base"):
        RolloutPlan.model_validate({**base, "bases": {"b": {"url": "http://127.0.0.1:8000/v1"}}})
    with pytest.raises(ValueError, match="give no 'adapter' beside it"):
        RolloutPlan.model_validate({**base, "bases": {"b": {"path": "/x"}},
                                    "models": {"g": {"base": "b", "router": "r", "adapter": "a"}}})


def test_models_on_a_shared_base_have_their_own_fingerprints(tmp_path, second_adapter):
    import torch

    from mergegate.evaluate.adapter_router import AdapterRouter
    from mergegate.gateway.api import fingerprints

    router = AdapterRouter(("noisy", "(base)"), torch.zeros(2, 4), torch.zeros(2), torch.zeros(4), torch.ones(4),
                           DEMO / "base", {"noisy": second_adapter}, {}).save(tmp_path / "router")
    plan = shared_plan(second_adapter)
    plan["models"]["gated"] = {"base": "demo", "router": str(router)}
    found = fingerprints(RolloutPlan.model_validate(plan))
    assert found["arithmetic"] == found["arithmetic_full"] and found["plain"] == found["plain_full"]
    assert len({found["arithmetic"], found["noisy"], found["plain"], found["gated"]}) == 4
