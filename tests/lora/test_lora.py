"""LoRA: merging an adapter into its base, combining adapters, extracting adapters, checked against PEFT 0.21
(merge_and_unload, add_weighted_adapter, PeftModel.from_pretrained) and against exact linear algebra."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergegate.errors import CheckpointError, IncompatibleModels, MergegateError, RecipeError
from mergegate.lora import COMBINATION_TYPES, combine_adapters, extract_adapter, merge_adapter, read_adapter
from mergegate.lora.combine import CombineOptions, Part, combine_module
from mergegate.lora.extract import REPORT_FILE, rank_for_energy

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo" / "models"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]



def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    settings.update(config)
    get_peft_model(_model(base), LoraConfig(**settings)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(family, tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters on the family base: a1, a2 (r=4, alpha=8), a3 (r=8, alpha=4), rsLoRA r1, r2 (r=4, alpha=8),
    p1 with rank and alpha patterns, e1, e2 on the input embeddings (lora_embedding_A/B) and q_proj."""
    root = tmp_path_factory.mktemp("adapters")
    base = family["base"]
    return {
        "a1": _make_adapter(base, root / "a1", 1),
        "a2": _make_adapter(base, root / "a2", 2),
        "a3": _make_adapter(base, root / "a3", 3, r=8, lora_alpha=4),
        "r1": _make_adapter(base, root / "r1", 4, use_rslora=True),
        "r2": _make_adapter(base, root / "r2", 5, use_rslora=True),
        "p1": _make_adapter(base, root / "p1", 6, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16}),
        "e1": _make_adapter(base, root / "e1", 7, target_modules=["embed_tokens", "q_proj"]),
        "e2": _make_adapter(base, root / "e2", 8, target_modules=["embed_tokens", "q_proj"]),
    }


@pytest.fixture(scope="module")
def peft_model(family, adapters):
    """One PeftModel holding every adapter, for add_weighted_adapter comparisons."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_model(family["base"]), adapters["a1"], adapter_name="a1")
    for name, path in adapters.items():
        if name != "a1":
            model.load_adapter(path, adapter_name=name)
    return model


def _lora_layers(model, adapter: str):
    """weight name → the PEFT LoRA layer holding `adapter`."""
    return {f"{name}.weight": module for name, module in model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and (adapter in module.lora_A or adapter in module.lora_embedding_A)}


def _peft_combined(model, names, weights, combination_type, **kwargs) -> dict[str, torch.Tensor]:
    new = f"{combination_type}_{len(model.peft_config)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density=1 prunes nothing
        model.add_weighted_adapter(list(names), list(weights), new, combination_type=combination_type, **kwargs)
    return {name: layer.get_delta_weight(new).detach() for name, layer in _lora_layers(model, new).items()}


def _ours(paths, weights, combination_type, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    combine_adapters(paths, weights, combination_type, out, **kwargs)
    adapter = read_adapter(out)
    return {name: adapter.delta(name) for name in adapter.modules}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _weighted_delta(paths, weights) -> dict[str, torch.Tensor]:
    read = [read_adapter(p) for p in paths]
    names = set().union(*(a.modules for a in read))
    return {n: sum(w * a.delta(n) for a, w in zip(read, weights) if n in a.modules) for n in names}


def _best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double())
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


# -- reading ---------------------------------------------------------------------------------------------------
def test_scaling_matches_peft_for_plain_rslora_and_patterns(adapters, peft_model):
    checked = 0
    for name in ("a1", "a3", "r1", "p1"):
        adapter = read_adapter(adapters[name])
        layers = _lora_layers(peft_model, name)
        assert layers.keys() == adapter.modules.keys()
        for weight_name, layer in layers.items():
            assert adapter.scaling(weight_name) == pytest.approx(layer.scaling[name], rel=1e-12), weight_name
            checked += 1
    assert checked == 4 * 2 * len(TARGETS)
    # the hand-computed values: alpha/r, alpha/sqrt(r), and the patterns
    assert read_adapter(adapters["a1"]).scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert read_adapter(adapters["a3"]).scaling("model.layers.0.self_attn.q_proj") == 0.5
    assert read_adapter(adapters["r1"]).scaling("model.layers.0.self_attn.q_proj") == 4.0
    patterned = read_adapter(adapters["p1"])
    assert patterned.modules["model.layers.1.self_attn.q_proj.weight"].rank == 2
    assert patterned.scaling("model.layers.1.self_attn.q_proj.weight") == 4.0  # 8 / 2
    assert patterned.scaling("model.layers.1.self_attn.v_proj.weight") == 4.0  # 16 / 4


# -- merging into the base -------------------------------------------------------------------------------------
def _peft_merged(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_model(base), adapter).merge_and_unload().eval()


def _compare_merge(base: Path, adapter: Path, out: Path, vocab: int) -> tuple[float, float]:
    merge_adapter(base, adapter, out)
    ours, theirs = _model(out), _peft_merged(base, adapter)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    weights = max((mine[k] - ref[k]).abs().max().item() for k in mine)
    ids = torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    return weights, logits


@pytest.mark.parametrize("name", ["a1", "r1", "p1", "e1"])
def test_merge_equals_peft_merge_and_unload(family, adapters, tmp_path, name):
    weights, logits = _compare_merge(family["base"], adapters[name], tmp_path / "merged", vocab=90)
    print(f"{name}: max |ours - PEFT merge_and_unload| weights {weights:.3g}, logits {logits:.3g}")
    assert weights < 1e-6, f"weights differ from PEFT's merge_and_unload by {weights}"
    assert logits < 1e-5, f"logits differ by {logits}"


def test_merge_demo_adapter_equals_peft(tmp_path):
    weights, logits = _compare_merge(DEMO / "base", DEMO / "arithmetic_lora", tmp_path / "merged", vocab=95)
    print(f"demo arithmetic_lora: max |ours - PEFT| weights {weights:.3g}, logits {logits:.3g}")
    assert weights < 1e-6, f"weights differ from PEFT's merge_and_unload by {weights}"
    assert logits < 1e-5, f"logits differ by {logits}"


def test_merge_weight_scales_the_delta_and_copies_the_rest(family, adapters, tmp_path):
    out = merge_adapter(family["base"], adapters["a1"], tmp_path / "half", weight=0.5)
    merged, base = load_file(out / "model.safetensors"), load_file(family["base"] / "model.safetensors")
    adapter = read_adapter(adapters["a1"])
    name = "model.layers.1.mlp.down_proj.weight"
    # hand computation: W + 0.5 · (alpha/r = 2) · B@A
    lora = adapter.modules[name]
    expected = base[name] + 0.5 * 2.0 * (lora.B @ lora.A)
    diff = (merged[name] - expected).abs().max().item()
    assert diff < 1e-6, f"max abs diff {diff}"
    untouched = [n for n in base if n not in adapter.modules]
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".*partial"))


def test_merge_failure_leaves_nothing_at_out_dir(family, adapters, tmp_path, monkeypatch):
    from mergegate.lora.adapter import Adapter

    calls = []

    def failing_delta(self, module, weight=1.0):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return torch.zeros(self.modules[module].weight_shape)

    monkeypatch.setattr(Adapter, "delta", failing_delta)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_adapter(family["base"], adapters["a1"], tmp_path / "out")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder


def test_merge_refuses_non_empty_out_dir(family, adapters, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergegateError, match="not empty"):
        merge_adapter(family["base"], adapters["a1"], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


# -- combining ---------------------------------------------------------------------------------------------------
PEFT_CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.5}),
    ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}), ("dare_linear_svd", {"density": 1.0}),
    ("dare_ties_svd", {"density": 1.0}),
]


def test_every_type_is_covered():
    assert {case for case, _ in PEFT_CASES} == set(COMBINATION_TYPES)


@pytest.mark.parametrize("combination_type,kwargs", PEFT_CASES,
                         ids=[f"{c}-{'-'.join(map(str, k.values()))}" for c, k in PEFT_CASES])
def test_combination_agrees_with_peft(adapters, peft_model, tmp_path, combination_type, kwargs):
    weights = [0.7, -0.4]
    theirs = _peft_combined(peft_model, ["a1", "a2"], weights, combination_type, **kwargs)
    ours = _ours([adapters["a1"], adapters["a2"]], weights, combination_type, tmp_path / "c", **kwargs)
    diff = _max_diff(ours, theirs)
    print(f"{combination_type} {kwargs}: max |ours - PEFT| = {diff:.3g}")
    assert diff < 1e-5, f"{combination_type} {kwargs}: max abs diff to PEFT {diff}"


@pytest.mark.parametrize("combination_type,kwargs", [("cat", {}), ("svd", {}), ("linear", {}),
                                                     ("ties_svd", {"density": 0.5})])
def test_embedding_adapters_combine_like_peft(adapters, peft_model, tmp_path, combination_type, kwargs):
    """Embedding LoRA (lora_embedding_A/B, stored transposed) next to a linear one."""
    theirs = _peft_combined(peft_model, ["e1", "e2"], [0.6, 0.3], combination_type, **kwargs)
    ours = _ours([adapters["e1"], adapters["e2"]], [0.6, 0.3], combination_type, tmp_path / "c", **kwargs)
    assert "model.embed_tokens.weight" in ours
    diff = _max_diff(ours, theirs)
    scale = max(t.abs().max().item() for t in theirs.values())  # embedding deltas here reach ~10
    print(f"embedding {combination_type}: max |ours - PEFT| = {diff:.3g} (largest entry {scale:.3g})")
    assert diff < 1e-6 * scale, f"max abs diff to PEFT {diff} for entries up to {scale}"


def test_fan_in_fan_out_adapter_on_gpt2_merges_like_peft(tmp_path):
    """GPT-2's Conv1D stores weights (in, out): PEFT's fan_in_fan_out adapters add (B@A).T."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=60, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    adapter = _make_adapter(tmp_path / "gpt2", tmp_path / "lora", 3, target_modules=["c_attn", "c_proj"],
                            fan_in_fan_out=True)
    assert read_adapter(adapter).modules["transformer.h.0.attn.c_attn.weight"].weight_shape == (32, 96)
    weights, logits = _compare_merge(tmp_path / "gpt2", adapter, tmp_path / "merged", vocab=60)
    print(f"gpt2 fan_in_fan_out: max |ours - PEFT| weights {weights:.3g}, logits {logits:.3g}")
    assert weights < 1e-6 and logits < 1e-5, (weights, logits)


def test_cat_and_svd_follow_the_weighted_delta(adapters, tmp_path):
    """cat is exact; svd is the best rank-k approximation of the exact weighted delta (Eckart–Young), exact once
    k reaches the summed rank. Mixed ranks (4 and 8) included."""
    paths, weights = [adapters["a1"], adapters["a3"]], [0.7, 0.5]
    exact = _weighted_delta(paths, weights)
    cat = _ours(paths, weights, "cat", tmp_path / "cat")
    assert read_adapter(tmp_path / "cat").modules["model.layers.0.self_attn.q_proj.weight"].rank == 12
    d_cat = _max_diff(cat, exact)
    svd8 = _ours(paths, weights, "svd", tmp_path / "svd")  # default rank: the largest input rank, 8
    best8 = {n: _best_rank(d, 8) for n, d in exact.items()}
    d_svd8 = _max_diff(svd8, best8)
    svd12 = _ours(paths, weights, "svd", tmp_path / "svd12", svd_rank=12)
    d_svd12 = _max_diff(svd12, exact)
    print(f"cat vs exact {d_cat:.3g}; svd(8) vs best rank-8 {d_svd8:.3g}; svd(12) vs exact {d_svd12:.3g}")
    assert d_cat < 1e-6, f"cat: max abs diff to the weighted delta {d_cat}"
    assert d_svd8 < 1e-5, f"svd: max abs diff to the best rank-8 approximation {d_svd8}"
    assert d_svd12 < 1e-5, f"svd at full rank: max abs diff to the weighted delta {d_svd12}"


def test_pruned_svd_types_equal_best_rank_k_of_peft_rules_on_full_deltas(adapters, tmp_path):
    """ties_svd / magnitude_prune_svd: PEFT's merge_utils rule applied to the full deltas, then rank k."""
    from peft.utils import merge_utils

    paths, weights = [adapters["a1"], adapters["a2"]], [0.7, 0.5]
    read = [read_adapter(p) for p in paths]
    for kind, rule in (("ties_svd", lambda d, w: merge_utils.ties(d, w, 0.3, "total")),
                       ("magnitude_prune_svd", lambda d, w: merge_utils.magnitude_prune(d, w, 0.3))):
        ours = _ours(paths, weights, kind, tmp_path / kind, density=0.3, svd_rank=3)
        reference = {n: _best_rank(rule([a.delta(n) for a in read], torch.tensor(weights)), 3) for n in ours}
        diff = _max_diff(ours, reference)
        print(f"{kind}: max |ours - best rank-3 of the rule on full deltas| = {diff:.3g}")
        assert diff < 1e-5, f"{kind}: max abs diff {diff}"


def test_linear_is_exact_for_one_adapter_and_an_approximation_for_several(adapters, peft_model, tmp_path):
    """PEFT's `linear` combines A and B separately: B@A picks up cross terms B_i A_j. We match PEFT (the type's
    definition); the weighted sum of deltas is what cat and full-rank svd give."""
    single = _ours([adapters["a1"]], [0.6], "svd", tmp_path / "one", svd_rank=1)  # one adapter: always linear
    exact = _weighted_delta([adapters["a1"]], [0.6])
    assert read_adapter(tmp_path / "one").modules["model.layers.0.self_attn.q_proj.weight"].rank == 4
    d_single = _max_diff(single, exact)
    paths = [adapters["a1"], adapters["a2"]]
    two = _ours(paths, [0.5, 0.5], "linear", tmp_path / "two")
    d_two = _max_diff(two, _weighted_delta(paths, [0.5, 0.5]))
    print(f"linear, one adapter vs exact {d_single:.3g}; two adapters vs weighted sum {d_two:.3g} (cross terms)")
    assert d_single < 1e-6, f"single adapter: max abs diff {d_single}"
    assert d_two > 1e-3  # documents that `linear` is not the weighted sum of deltas


def test_rslora_combination_is_the_weighted_sum_where_peft_overscales(adapters, peft_model, tmp_path):
    """PEFT (#3761) copies use_rslora into the combined config with lora_alpha = r, so its combined delta is
    scaled by r/sqrt(r) = sqrt(r) once more. Ours sets scaling 1 and equals the weighted sum of true deltas."""
    paths, weights = [adapters["r1"], adapters["r2"]], [0.7, 0.5]
    exact = _weighted_delta(paths, weights)
    ours = _ours(paths, weights, "cat", tmp_path / "cat")
    diff = _max_diff(ours, exact)
    svd = _ours(paths, weights, "svd", tmp_path / "svd", svd_rank=8)
    diff_svd = _max_diff(svd, exact)
    theirs = _peft_combined(peft_model, ["r1", "r2"], weights, "cat")
    ratio = max(theirs[n].norm().item() / exact[n].norm().item() for n in exact)
    print(f"rsLoRA cat: ours vs weighted sum {diff:.3g}, svd {diff_svd:.3g}; PEFT/exact norm ratio {ratio:.4f} "
          f"(sqrt(8) = {math.sqrt(8):.4f})")
    assert diff < 1e-6, f"ours vs the weighted sum of rsLoRA deltas: {diff}"
    assert diff_svd < 1e-5, f"svd vs the weighted sum: {diff_svd}"
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 8
    # PEFT 0.21 still over-scales; if a later PEFT fixes it the ratio becomes 1 and this still passes
    assert ratio == pytest.approx(math.sqrt(8), rel=1e-4) or ratio == pytest.approx(1.0, rel=1e-4), ratio


def test_peft_loads_a_combined_adapter_with_mixed_ranks(family, adapters, tmp_path):
    """cat of rank-patterned p1 (q_proj rank 2) and a1 (rank 4): per-module ranks 6 and 8, via rank_pattern."""
    from peft import PeftModel

    out = tmp_path / "cat"
    ours = _ours([adapters["p1"], adapters["a1"]], [1.0, 0.5], "cat", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["rank_pattern"].values()) == {6}
    loaded = PeftModel.from_pretrained(_model(family["base"]), out)
    deltas = {n: layer.get_delta_weight("default").detach() for n, layer in _lora_layers(loaded, "default").items()}
    diff = _max_diff(ours, deltas)
    exact = _max_diff(ours, _weighted_delta([adapters["p1"], adapters["a1"]], [1.0, 0.5]))
    print(f"PEFT-loaded combined adapter vs ours {diff:.3g}; vs weighted sum {exact:.3g}")
    assert diff < 1e-6 and exact < 1e-6, (diff, exact)


def test_dare_statistics_and_seeding(adapters, tmp_path):
    """DARE keeps each entry with probability `density` and divides by it: combined A/B entries are zero where
    every adapter dropped them ((1-p)^2 for two), and the mean over seeds is the undropped combination."""
    read = [read_adapter(adapters["a1"]), read_adapter(adapters["a2"])]
    name = "model.layers.0.mlp.down_proj.weight"
    parts = [Part(a.modules[name], a.scaling(name), w) for a, w in zip(read, (0.6, 0.4))]
    reference, _ = combine_module("m", parts, CombineOptions("linear"), 4)
    draws = torch.stack([combine_module("m", parts, CombineOptions("dare_linear", density=0.5, seed=s), 4)[0]
                         for s in range(400)])
    zero_fraction = (draws == 0).float().mean().item()
    mean_error = ((draws.mean(0) - reference).norm() / reference.norm()).item()
    print(f"dare_linear p=0.5: zero fraction {zero_fraction:.4f} (expected 0.25); relative error of the mean over "
          f"400 seeds {mean_error:.4f}")
    assert abs(zero_fraction - 0.25) < 0.01, zero_fraction
    assert mean_error < 0.1, mean_error  # ~ sqrt(var/400): about 0.05 here
    paths = [adapters["a1"], adapters["a2"]]
    same1 = _ours(paths, [0.6, 0.4], "dare_ties", tmp_path / "s1", density=0.5, seed=7)
    same2 = _ours(paths, [0.6, 0.4], "dare_ties", tmp_path / "s2", density=0.5, seed=7)
    other = _ours(paths, [0.6, 0.4], "dare_ties", tmp_path / "s3", density=0.5, seed=8)
    assert _max_diff(same1, same2) == 0.0
    assert _max_diff(same1, other) > 0.0


def test_combine_refuses_bad_arguments_and_mismatched_adapters(family, adapters, tmp_path):
    paths = [adapters["a1"], adapters["a2"]]
    with pytest.raises(RecipeError, match="needs density"):
        combine_adapters(paths, [1, 1], "ties", tmp_path / "x")
    with pytest.raises(RecipeError, match="combination_type='mean'"):
        combine_adapters(paths, [1, 1], "mean", tmp_path / "x")
    with pytest.raises(RecipeError, match="weights: 1 given for 2 adapters"):
        combine_adapters(paths, [1], "cat", tmp_path / "x")
    with pytest.raises(IncompatibleModels, match="needs equal ranks.*\\[4, 8\\]"):
        combine_adapters([adapters["a1"], adapters["a3"]], [1, 1], "linear", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- extracting --------------------------------------------------------------------------------------------------
def _orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q


@pytest.fixture(scope="module")
def lowrank_finetune(family, tmp_path_factory) -> Path:
    """base + an exact rank-4 delta on every q_proj/v_proj/o_proj/down_proj, singular values (4, 3, 2, 1)·0.05
    on q_proj and (1, 1, 1, 1)·0.05 elsewhere, + noise of std 1e-6; a norm weight also changes (not a target)."""
    folder = tmp_path_factory.mktemp("lowrank")
    for item in family["base"].iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copyfile(item, folder / item.name)
    state = load_file(family["base"] / "model.safetensors")
    generator = torch.Generator().manual_seed(11)
    for name in sorted(state):
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf in TARGETS:
            out_f, in_f = state[name].shape
            spectrum = torch.tensor([4.0, 3.0, 2.0, 1.0] if leaf == "q_proj" else [1.0] * 4) * 0.05
            delta = (_orthonormal(out_f, 4, generator) * spectrum) @ _orthonormal(in_f, 4, generator).T
            state[name] = state[name] + delta + 1e-6 * torch.randn(state[name].shape, generator=generator)
    state["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"] + 0.01
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_extract_rank4_round_trip_through_peft(family, lowrank_finetune, tmp_path):
    from peft import PeftModel

    with pytest.warns(UserWarning, match="largest is 'model.layers.0.input_layernorm.weight'"):
        out = extract_adapter(family["base"], lowrank_finetune, tmp_path / "ex", rank=4, target_modules=TARGETS)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {} and sorted(config["target_modules"]) == sorted(TARGETS)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped"][0]["tensor"] == "model.layers.0.input_layernorm.weight"
    assert report["skipped"][0]["norm"] == pytest.approx(0.01 * 8, rel=1e-3)  # 64 entries moved by 0.01
    loaded = PeftModel.from_pretrained(_model(family["base"]), out).eval()
    tuned = _model(lowrank_finetune)
    # put the norm change the adapter cannot carry into the PEFT model, so only the LoRA part is compared
    with torch.no_grad():
        loaded.base_model.model.model.layers[0].input_layernorm.weight.add_(0.01)
    ids = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (loaded(ids).logits - tuned(ids).logits).abs().max().item()
        moved = (_model(family["base"])(ids).logits - tuned(ids).logits).abs().max().item()
    print(f"extract rank 4: max |logits(PEFT-loaded adapter) - logits(fine-tune)| = {diff:.3g} "
          f"(the fine-tune moved logits by {moved:.3g})")
    assert diff < 1e-4, f"max abs logit diff {diff}"
    assert moved > 100 * diff


def test_extract_energy_picks_the_expected_rank_and_peft_honours_rank_pattern(family, lowrank_finetune, tmp_path):
    """q_proj energies: 16/30, 25/30, 29/30, 1 → 0.9 needs rank 3; flat spectra (1,1,1,1) need 4 (0.9 > 3/4)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = extract_adapter(family["base"], lowrank_finetune, tmp_path / "ex", energy=0.9, target_modules=TARGETS,
                              alpha=16)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 3 for i in range(2)}
    adapter = read_adapter(out)
    assert adapter.scaling("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 3)
    loaded = PeftModel.from_pretrained(_model(family["base"]), out)
    layers = _lora_layers(loaded, "default")
    assert layers["model.layers.1.self_attn.q_proj.weight"].r["default"] == 3
    assert layers["model.layers.1.self_attn.v_proj.weight"].r["default"] == 4
    # the rank-3 truncation of q_proj drops exactly the smallest singular value (0.05)
    base = load_file(family["base"] / "model.safetensors")
    tuned = load_file(lowrank_finetune / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    residual = torch.linalg.matrix_norm(tuned[name] - base[name] - adapter.delta(name), ord=2).item()
    assert residual == pytest.approx(0.05, rel=1e-3)
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [rank_for_energy(s, e, 4) for e in (0.5, 0.54, 0.9, 0.97, 1.0)] == [1, 2, 3, 4, 4]
    assert rank_for_energy(s, 1.0, 2) == 2


def test_extract_default_targets_every_linear_weight(family, tmp_path):
    with pytest.warns(UserWarning, match="not LoRA targets"):
        out = extract_adapter(family["base"], family["ft1"], tmp_path / "ex", rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    skipped = {s["tensor"] for s in json.loads((out / REPORT_FILE).read_text())["skipped"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= skipped


def test_extract_refuses_missing_rank_and_unknown_targets(family, tmp_path):
    with pytest.raises(RecipeError, match="give rank"):
        extract_adapter(family["base"], family["ft1"], tmp_path / "x")
    with pytest.raises(RecipeError, match="'qq_proj' matches no weight"):
        extract_adapter(family["base"], family["ft1"], tmp_path / "x", rank=2, target_modules=["qq_proj"])
    with pytest.raises(RecipeError, match="input_layernorm.weight' of shape \\[64\\]; only 2-D"):
        extract_adapter(family["base"], family["ft1"], tmp_path / "x", rank=2, target_modules=["input_layernorm"])
    with pytest.raises(RecipeError, match="embed_tokens.weight' of shape .*not embeddings"):
        extract_adapter(family["base"], family["ft1"], tmp_path / "x", rank=2, target_modules=["embed_tokens"])


# -- refusals ----------------------------------------------------------------------------------------------------
def test_adapter_for_a_different_base_shape_is_refused_naming_the_tensor(family, tmp_path):
    from mergegate.demo.samples import SampleShape, write_base

    other = write_base(tmp_path / "other", SampleShape(hidden=32, intermediate=64))
    adapter = _make_adapter(other, tmp_path / "other_lora", 1)
    with pytest.raises(IncompatibleModels, match="tensor 'model.layers.0.mlp.down_proj.weight' is \\[64, 128\\] in "
                                                 "base .* adapter's delta is \\[32, 64\\]"):
        merge_adapter(family["base"], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_naming_a_local_base_with_another_architecture_is_refused(family, adapters, tmp_path):
    from mergegate.demo.samples import SampleShape, write_base

    other = write_base(tmp_path / "wide", SampleShape(layers=3))
    moved = shutil.copytree(adapters["a1"], tmp_path / "lora")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModels, match="num_hidden_layers: 3 vs 2"):
        merge_adapter(family["base"], moved, tmp_path / "out")


def test_pickle_weights_are_refused_unless_allowed(family, adapters, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(adapters["a1"] / "adapter_config.json", folder / "adapter_config.json")
    torch.save(load_file(adapters["a1"] / "adapter_model.safetensors"), folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin: pickle weights.*allow_pickle"):
        read_adapter(folder)
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        merge_adapter(family["base"], folder, tmp_path / "out")
    pickled, safe = read_adapter(folder, allow_pickle=True), read_adapter(adapters["a1"])
    assert all(torch.equal(pickled.delta(n), safe.delta(n)) for n in safe.modules)


def test_missing_files_are_named(adapters, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        read_adapter(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter(empty)
    shutil.copyfile(adapters["a1"] / "adapter_config.json", empty / "adapter_config.json")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        read_adapter(empty)


@pytest.mark.parametrize("field,value,message", [
    ("use_dora", True, "use_dora=true is not supported \\(DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save=\\[\"lm_head\"\\] is not supported"),
    ("bias", "lora_only", "bias='lora_only' is not supported"),
    ("lora_bias", True, "lora_bias=true is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("peft_type", "IA3", "peft_type='IA3'"),
])
def test_unsupported_config_fields_are_refused_by_name(adapters, tmp_path, field, value, message):
    folder = shutil.copytree(adapters["a1"], tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_adapter(folder)


def test_foreign_tensors_and_rank_mismatches_are_refused(adapters, tmp_path):
    folder = shutil.copytree(adapters["a1"], tmp_path / "lora")
    state = load_file(folder / "adapter_model.safetensors")
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="tensor '.*q_proj.lora_magnitude_vector' is not a LoRA A/B matrix"):
        read_adapter(folder)
    config = json.loads((adapters["a1"] / "adapter_config.json").read_text())
    config["r"] = 8
    shutil.copyfile(adapters["a1"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has rank 4 but the config says r=8"):
        read_adapter(folder)
    state = load_file(adapters["a1"] / "adapter_model.safetensors")
    state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")
    shutil.copyfile(adapters["a1"] / "adapter_config.json", folder / "adapter_config.json")
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.lora_A.weight' holds NaN"):
        read_adapter(folder)
