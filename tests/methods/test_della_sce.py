"""della, della_linear and sce: hand-computed cases, statistics of the random drop, and agreement with mergekit.

mergekit (the peer, 0.1.5) is called on the same float32 tensors through its own functions. della's draws
cannot match mergekit's RNG, so its random path is compared two ways: with mergekit's `torch.bernoulli`
replaced by draws from the same seeded generator mergegate uses (then the two must agree exactly), and by
distribution (kept fraction and rescaled mean per magnitude band) with each side's own RNG.
"""

from __future__ import annotations

import pytest
import torch

from mergegate.errors import RecipeError
from mergegate.methods import get_method
from mergegate.methods._sparsify import della as della_drop
from mergegate.methods._sparsify import della_keep_probabilities

from ..helpers import recipe_for

T = lambda *values: torch.tensor(values, dtype=torch.float32)  # noqa: E731


def run(name, base, tensors, per_model=None, rng=None, **shared):
    method = get_method(name)
    if method.per_model_params:
        per_model = [method.per_model(**p) for p in (per_model or [{"weight": 1.0}] * len(tensors))]
    else:
        per_model = [method.per_model()] * len(tensors)
    shared = {("lambda_" if k == "lambda" else k): v for k, v in shared.items()}
    return method(base, tensors, per_model, method.shared(**shared), rng)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mergekit_merge(name, base, tensors, **parameters):
    """mergekit's own merge of one tensor group (base first), in float32."""
    merge_methods = pytest.importorskip("mergekit.merge_methods")
    return merge_methods.merge_tensors([base, *tensors], name, parameters=parameters, base_index=0,
                                       dtype=torch.float32)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------- declarations


def test_parameters_and_defaults_match_mergekit_notes():
    """shared/notes/mergekit-0.1.5-method-parameters.txt, lines della, della_linear and sce."""
    def declared(name):
        method = get_method(name)
        return ({p.name: p.default for p in method.shared_params},
                {p.name: (None if p.required else p.default) for p in method.per_model_params})

    assert declared("della") == ({"normalize": True, "rescale": True, "lambda": 1.0, "int8_mask": False},
                                 {"weight": None, "density": 1.0, "epsilon": 0.15})
    assert declared("della_linear") == ({"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
                                        {"weight": None, "density": 1.0, "epsilon": 0.15})
    assert declared("sce") == ({"select_topk": 1.0, "int8_mask": False}, {})
    assert get_method("della").random and get_method("della_linear").random and not get_method("sce").random
    # ranks per row, L1 rescale over the whole tensor, variance top-k: none of them is elementwise
    assert not any(get_method(n).elementwise for n in ("della", "della_linear", "sce"))


# ---------------------------------------------------------------- della: keep probabilities


def test_della_keep_probability_is_linear_in_magnitude_rank_within_each_row():
    # ranks by |x|: 0.1 -> 1, 0.2 -> 2, 0.3 -> 3, 0.4 -> 4, 0.5 -> 5; window [0.3, 0.7]
    got = della_keep_probabilities(T(0.1, -0.4, 0.3, 0.2, -0.5).abs(), 0.5, 0.2)
    assert torch.allclose(got, T(0.3, 0.6, 0.5, 0.4, 0.7), atol=1e-7), got
    rows = torch.tensor([[1.0, 3.0, 2.0], [9.0, 8.0, 7.0]])  # each row ranked on its own
    assert torch.allclose(della_keep_probabilities(rows, 0.5, 0.2),
                          torch.tensor([[0.3, 0.7, 0.5], [0.7, 0.5, 0.3]]), atol=1e-7)


def test_della_ranks_ties_in_index_order_and_gives_one_element_rows_the_density():
    got = della_keep_probabilities(torch.full((2, 4), 0.25), 0.4, 0.3)  # every magnitude equal
    expected = torch.tensor([0.1, 0.3, 0.5, 0.7]).expand(2, 4)
    assert torch.allclose(got, expected, atol=1e-7), got
    assert torch.equal(got, della_keep_probabilities(torch.full((2, 4), 0.25), 0.4, 0.3))  # and repeatable
    # a row of one element is both the smallest and the largest: the window's middle (mergekit fails here)
    assert torch.allclose(della_keep_probabilities(torch.tensor([[3.0], [1.0]]), 0.4, 0.3), torch.full((2, 1), 0.4))


def test_della_keep_probabilities_equal_mergekit_bit_for_bit(monkeypatch):
    """mergekit's probabilities, captured at its `torch.bernoulli` call, against ours (same float32 ops)."""
    pytest.importorskip("mergekit")
    captured = []

    def capture(probs, *args, **kwargs):
        captured.append(probs.clone())
        return torch.ones_like(probs)

    torch.manual_seed(3)
    cases = [(torch.randn(48, 300), 0.3, 0.2), (torch.randn(1000), 0.7, 0.25), (torch.randn(6, 40, 5), 0.5, 0.1),
             (torch.randn(64, 64), 0.2, 0.0)]
    for delta, density, epsilon in cases:
        base = torch.randn_like(delta)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "bernoulli", capture)
            mergekit_merge("della_linear", base, [base + delta], weight=1.0, density=density, epsilon=epsilon)
        theirs = captured.pop().reshape(delta.shape)
        ours = della_keep_probabilities(((base + delta) - base).abs(), density, epsilon)
        print(f"keep probabilities {tuple(delta.shape)} d={density} e={epsilon}: max |diff| {max_diff(ours, theirs)}")
        assert torch.equal(ours, theirs), max_diff(ours, theirs)


# ---------------------------------------------------------------- della: the random drop


def test_della_at_epsilon_zero_is_a_seeded_uniform_drop_with_the_density_as_keep_rate():
    base, a, b = torch.randn(3, 100_000).unbind()
    per_model = [{"weight": 1.0, "density": 0.3, "epsilon": 0.0}, {"weight": 0.5, "density": 0.3, "epsilon": 0.0}]
    linear = run("della_linear", base, [a, b], per_model, rng=seeded(11))
    # every probability is the density: the same draws as DARE's keep-with-probability-density
    dare = run("dare_linear", base, [a, b], [{k: p[k] for k in ("weight", "density")} for p in per_model],
               rng=seeded(11))
    assert torch.equal(linear, dare), max_diff(linear, dare)
    ties = run("della", base, [a, b], per_model, rng=seeded(11))
    assert torch.equal(ties, run("dare_ties", base, [a, b], [{k: p[k] for k in ("weight", "density")}
                                                              for p in per_model], rng=seeded(11), normalize=True))
    kept = della_drop(a.clone(), 0.3, 0.0, rescale=False, rng=seeded(5)) != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.006, float(kept.float().mean())  # sd 0.0015


def _band_stats(delta: torch.Tensor, result: torch.Tensor, bands: int = 5):
    """Kept fraction and mean of result/delta in each magnitude band (rank quintiles of each row)."""
    rank = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1)
    band = rank * bands // delta.shape[1]
    ratio = result / delta
    fractions = [float((result[band == q] != 0).float().mean()) for q in range(bands)]
    means = [float(ratio[band == q].mean()) for q in range(bands)]
    return fractions, means


def test_della_drop_follows_the_rank_window_like_mergekit_in_distribution():
    sparsify = pytest.importorskip("mergekit.sparsify")
    torch.manual_seed(0)
    delta = torch.randn(64, 2048)
    density, epsilon = 0.4, 0.2
    ours = della_drop(delta.clone(), density, epsilon, rescale=True, rng=seeded(1))
    torch.manual_seed(1)
    theirs = sparsify.della_magprune(delta.clone(), density, epsilon, rescale_norm=sparsify.RescaleNorm.l1)
    our_kept, our_mean = _band_stats(delta, ours)
    their_kept, their_mean = _band_stats(delta, theirs)
    # expected keep rate of band q: mean of the linear window over it
    expected = [density - epsilon + 2 * epsilon * (q + 0.5) / 5 for q in range(5)]
    print(f"kept by band: expected {expected}, mergegate {our_kept}, mergekit {their_kept}")
    print(f"mean result/delta by band: mergegate {our_mean}, mergekit {their_mean}")
    # not promised (torch's bernoulli could draw differently), only reported: same seed, same bits?
    print(f"same seed gives identical output to mergekit's della_magprune: {torch.equal(ours, theirs)}")
    for q in range(5):
        assert abs(our_kept[q] - expected[q]) < 0.01, (q, our_kept, expected)
        assert abs(our_kept[q] - their_kept[q]) < 0.015, (q, our_kept, their_kept)
        assert abs(our_mean[q] - their_mean[q]) < 0.03 * their_mean[q], (q, our_mean, their_mean)
    overall = float((ours != 0).float().mean())
    assert abs(overall - density) < 0.005, overall
    # the L1 rescale is exact, on every draw
    assert torch.allclose(ours.abs().sum(), delta.abs().sum(), rtol=1e-5)
    assert torch.allclose(theirs.abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_della_rescale_restores_the_expectation_at_epsilon_zero_and_the_l1_norm_always():
    torch.manual_seed(2)
    delta = torch.randn(2000)
    draws = 300
    rescaled = torch.stack([della_drop(delta.clone(), 0.3, 0.0, True, seeded(s)) for s in range(draws)])
    plain = torch.stack([della_drop(delta.clone(), 0.3, 0.0, False, seeded(s)) for s in range(draws)])
    average = rescaled.mean(0)
    slope = float((average * delta).sum() / (delta * delta).sum())  # E[result] = slope * delta
    assert abs(slope - 1) < 0.01, slope
    assert float(((average - delta).abs() / delta.abs()).median()) < 0.1
    plain_slope = float((plain.mean(0) * delta).sum() / (delta * delta).sum())
    assert abs(plain_slope - 0.3) < 0.01, plain_slope  # without rescale: density * delta
    # with a window, L1 norm restored on every draw; the drop mask is the same with and without rescale
    for seed in range(5):
        windowed = della_drop(delta.clone(), 0.3, 0.2, True, seeded(seed))
        unscaled = della_drop(delta.clone(), 0.3, 0.2, False, seeded(seed))
        assert torch.allclose(windowed.abs().sum(), delta.abs().sum(), rtol=1e-5)
        assert torch.equal(windowed != 0, unscaled != 0) and torch.equal(unscaled, delta * (unscaled != 0))


def test_della_is_seeded():
    base, a, b = torch.randn(3, 32, 64).unbind()
    per_model = [{"weight": 0.6, "density": 0.5, "epsilon": 0.2}] * 2
    first = run("della", base, [a, b], per_model, rng=seeded(42))
    assert torch.equal(first, run("della", base, [a, b], per_model, rng=seeded(42)))
    assert not torch.equal(first, run("della", base, [a, b], per_model, rng=seeded(43)))


# ---------------------------------------------------------------- della: against mergekit, draws shared


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(40, 96), (500,)])
def test_della_equals_mergekit_when_both_draw_from_the_same_generator(monkeypatch, name, shape):
    pytest.importorskip("mergekit")
    torch.manual_seed(7)
    base = torch.randn(shape)
    tensors = [base + 0.1 * torch.randn(shape) for _ in range(3)]
    weights, densities, epsilons = [1.0, 0.5, 0.8], [0.5, 0.3, 0.7], [0.2, 0.1, 0.25]
    shared = {"lambda": 0.9}
    per_model = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    ours = run(name, base, tensors, per_model, rng=seeded(99), **shared)

    generator = seeded(99)

    def same_draws(probs, *args, **kwargs):  # mergegate's draw: uniform < probability, in model order
        return (torch.rand(probs.shape, generator=generator, dtype=torch.float32) < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", same_draws)
    theirs = mergekit_merge(name, base, tensors, weight=weights, density=densities, epsilon=epsilons, **shared)
    diff = max_diff(ours, theirs)
    print(f"{name} {shape} vs mergekit, same draws: max |diff| {diff:.3g}")
    assert diff < 1e-6, diff
    assert not torch.equal(ours, run(name, base, tensors, [dict(p, density=1.0) for p in per_model], **shared))


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_at_density_one_equals_mergekit(name):
    torch.manual_seed(8)
    base = torch.randn(24, 80)
    tensors = [base + 0.05 * torch.randn_like(base) for _ in range(3)]
    weights = [1.0, -0.4, 0.7]
    for shared in ({}, {"normalize": False, "lambda": 1.3}, {"normalize": True, "rescale": False}):
        ours = run(name, base, tensors, [{"weight": w, "density": 1.0, "epsilon": 0.1} for w in weights],
                   rng=seeded(0), **shared)
        theirs = mergekit_merge(name, base, tensors, weight=weights, density=1.0, epsilon=0.1, **shared)
        diff = max_diff(ours, theirs)
        print(f"{name} density=1 {shared} vs mergekit: max |diff| {diff:.3g}")
        assert diff < 1e-6, diff


def test_della_refuses_a_window_outside_zero_one_like_mergekit():
    method = get_method("della")
    with pytest.raises(RecipeError, match=r"density 0.1 with epsilon 0.15 .*use epsilon < 0.1"):
        method.per_model(weight=1.0, density=0.1)  # the default epsilon 0.15 does not fit
    with pytest.raises(RecipeError, match="density 0.9 with epsilon 0.1"):
        method.per_model(weight=1.0, density=0.9, epsilon=0.1)  # 0.9 + 0.1 reaches 1
    # nothing is dropped at density 1, everything at 0: no window to check, as in mergekit
    base, a = torch.zeros(8), torch.arange(1.0, 9.0)
    assert torch.equal(run("della", base, [a], [{"weight": 1.0, "density": 1.0, "epsilon": 0.9}]), a)
    assert torch.equal(run("della_linear", base, [a], [{"weight": 1.0, "density": 0.0, "epsilon": 0.9}]), base)
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        mergekit_merge("della", base, [a], weight=1.0, density=0.1)  # skips here without mergekit


def test_della_zero_deltas_return_the_base():
    base = torch.randn(16, 8)
    got = run("della", base, [base.clone(), base.clone()], [{"weight": 0.7, "density": 0.5, "epsilon": 0.1}] * 2,
              rng=seeded(0))
    assert torch.equal(got, base)


# ---------------------------------------------------------------- sce: by hand


def test_sce_weights_by_mean_square_and_erases_disagreeing_entries():
    base, a, b = torch.zeros(4), T(1, -2, 3, 0), T(2, 4, -2, 0)
    # mean squares 14/4 and 24/4 -> weights 7/19, 12/19; sums [3, 2, 1, 0] elect + everywhere
    # col 0 both agree: (7*1 + 12*2)/19; col 1 only b: 4; col 2 only a: 3; col 3 nobody: 0
    assert torch.allclose(run("sce", base, [a, b]), T(31 / 19, 4, 3, 0), atol=1e-6)
    shifted = T(1, 1, 1, 1)
    assert torch.allclose(run("sce", shifted, [a + shifted, b + shifted]), T(31 / 19, 4, 3, 0) + shifted, atol=1e-6)


def test_sce_select_topk_keeps_the_highest_variance_elements():
    base, a, b = torch.zeros(4), T(1, -2, 3, 0), T(2, 4, -2, 0)
    # variances across a, b: [0.25, 9, 6.25, 0]; 3 are nonzero
    # topk 0.5: int(3 * 0.5) = 1 -> col 1 only; a=[0,-2,0,0], b=[0,4,0,0]; + elected, b alone agrees: 4
    assert torch.allclose(run("sce", base, [a, b], select_topk=0.5), T(0, 4, 0, 0))
    # topk 0.7: int(2.1) = 2 -> cols 1, 2; col 1 -> b's 4, col 2 (sum +1) -> a's 3
    assert torch.allclose(run("sce", base, [a, b], select_topk=0.7), T(0, 4, 3, 0))
    assert torch.equal(run("sce", base, [a, b], select_topk=0.0), base)  # nothing selected
    # a single model has zero variance everywhere: nothing is selected, the base comes back (as in mergekit)
    assert torch.equal(run("sce", base, [a], select_topk=0.5), base)
    assert torch.allclose(run("sce", base, [a]), a)  # select_topk 1 keeps everything


def test_sce_zero_and_tiny_deltas():
    base = torch.randn(6)
    assert torch.equal(run("sce", base, [base.clone(), base.clone()]), base)
    # mean squares 1e-8 and 5e-8 sum below 1e-6: uniform weights 1/2, not 1/6 and 5/6
    a, b = T(1e-4, 1e-4), T(3e-4, -1e-4)
    got = run("sce", torch.zeros(2), [a, b])
    assert torch.allclose(got, T(2e-4, 1e-4), rtol=1e-5, atol=0), got  # col 0 mean of both, col 1 (sum 0: +) a


# ---------------------------------------------------------------- sce: against mergekit


@pytest.mark.parametrize("select_topk", [1.0, 0.8, 0.5, 0.1, 0.0])
def test_sce_equals_mergekit(select_topk):
    pytest.importorskip("mergekit")
    torch.manual_seed(int(select_topk * 10))
    base = torch.randn(64, 96)
    tensors = [base + scale * torch.randn_like(base) for scale in (0.02, 0.05, 0.01)]
    tensors.append(base.clone())  # a model identical to the base: zero delta
    tensors[1][:5] = base[:5]  # and rows where one model did not move
    cases = {"2d": (base, tensors), "1d": (base[0], [t[0] for t in tensors]), "one model": (base, tensors[:1]),
             # near-zero base: deltas of 1e-4 keep full precision, so no variances tie at the top-k threshold
             "tiny deltas": (1e-3 * base, [1e-3 * base + 1e-4 * torch.randn_like(base) for _ in range(2)])}
    for label, (b, ts) in cases.items():
        ours = run("sce", b, ts, select_topk=select_topk)
        theirs = mergekit_merge("sce", b, ts, select_topk=select_topk)
        diff = max_diff(ours, theirs)
        print(f"sce select_topk={select_topk} {label} vs mergekit: max |diff| {diff:.3g}")
        assert diff < 1e-6, (label, diff)


def test_sce_top_k_ties_are_broken_in_index_order_and_mergekit_picks_as_many():
    base, a, b = torch.zeros(5), T(3, 1, 1, 1, 0.5), torch.zeros(5)
    # variances a^2/4: [2.25, .25, .25, .25, .0625], all nonzero; k = int(5 * 0.6) = 3: col 0 and two of the
    # three tied cols; ascending ranks run in index order, so the top window holds the later ones (as TIES trim)
    got = run("sce", base, [a, b], select_topk=0.6)
    assert torch.equal(got, T(3, 0, 1, 1, 0)), got  # b has weight 0; a is alone and positive where kept
    assert torch.equal(got, run("sce", base, [a, b], select_topk=0.6))
    theirs = mergekit_merge("sce", base, [a, b], select_topk=0.6)
    print(f"sce with tied variances: mergegate {got.tolist()}, mergekit {theirs.tolist()}")
    assert int((theirs != 0).sum()) == 3 and theirs[0] == 3 and float(theirs.sum()) == 5.0


# ---------------------------------------------------------------- breadcrumbs_ties and int8_mask


def test_breadcrumbs_ties_defaults_and_math_equal_mergekit():
    per_model = {p.name: (None if p.required else p.default) for p in get_method("breadcrumbs_ties").per_model_params}
    shared = {p.name: p.default for p in get_method("breadcrumbs_ties").shared_params}
    assert per_model == {"weight": None, "density": 1.0, "gamma": 0.01}
    assert shared == {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
    pytest.importorskip("mergekit")
    torch.manual_seed(9)
    base = torch.randn(50, 60)
    tensors = [base + 0.1 * torch.randn_like(base) for _ in range(3)]
    weights, densities, gammas = [1.0, 0.6, -0.3], [0.5, 0.9, 0.3], [0.05, 0.01, 0.2]
    for shared in ({}, {"normalize": True, "rescale": True, "lambda": 0.8}):
        ours = run("breadcrumbs_ties", base, tensors,
                   [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)], **shared)
        theirs = mergekit_merge("breadcrumbs_ties", base, tensors, weight=weights, density=densities, gamma=gammas,
                                **shared)
        diff = max_diff(ours, theirs)
        print(f"breadcrumbs_ties {shared} vs mergekit: max |diff| {diff:.3g}")
        assert diff < 1e-6, diff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_mask_never_changes_mergekits_result(dtype):
    """In mergekit the int8 mask only holds signs (-1, 0, 1) or 0/1 selections, exact in any dtype, and the
    sign mask it feeds is the boolean `sign == elected`; so the output is bit-identical either way."""
    pytest.importorskip("mergekit")
    torch.manual_seed(10)
    base = torch.randn(32, 48).to(dtype)
    tensors = [(base.float() + 0.05 * torch.randn(32, 48)).to(dtype) for _ in range(3)]
    tensors.append(base.clone())
    merge_methods = pytest.importorskip("mergekit.merge_methods")
    for name, parameters in (("ties", {"weight": 1.0, "density": 0.5}), ("sce", {"select_topk": 0.5}),
                             ("della", {"weight": 1.0, "density": 1.0}), ("breadcrumbs_ties", {"weight": 0.5})):
        outputs = [merge_methods.merge_tensors([base, *tensors], name, base_index=0,
                                               parameters=dict(parameters, int8_mask=flag)) for flag in (False, True)]
        assert torch.equal(outputs[0], outputs[1]), (name, max_diff(*outputs))
    f32 = [t.float() for t in tensors]
    assert torch.equal(run("sce", base.float(), f32, select_topk=0.5, int8_mask=True),
                       run("sce", base.float(), f32, select_topk=0.5))


# ---------------------------------------------------------------- recipes


def test_della_recipe_merges_into_a_loadable_model(family, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import mergegate

    recipe = recipe_for("della", family, density=0.5, epsilon=0.2, weights=[1.0, 0.5, 0.5])
    out = tmp_path / "out"
    mergegate.merge(recipe, out, seed=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape[:2] == (1, 4) and bool(torch.isfinite(logits).all())

    merged = {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(shard).items()}
    base = {k: v for shard in sorted(family["base"].glob("*.safetensors")) for k, v in load_file(shard).items()}
    name = "model.layers.0.mlp.down_proj.weight"
    changed = merged[name] != base[name]
    # each of the three deltas keeps an entry with probability ~0.5, independently; an entry stays the base's
    # only when all three are dropped (a kept one always agrees with the sign it helped elect): 1 - 0.5^3
    assert abs(float(changed.float().mean()) - 0.875) < 0.03, float(changed.float().mean())

    again = tmp_path / "again"
    mergegate.merge(recipe, again, seed=3)
    repeat = {k: v for shard in sorted(again.glob("*.safetensors")) for k, v in load_file(shard).items()}
    assert all(torch.equal(merged[k], repeat[k]) for k in merged)  # seeded: same bytes


def test_sce_and_della_linear_recipes_merge(family, tmp_path):
    from transformers import AutoModelForCausalLM

    import mergegate

    sce_recipe = {"merge_method": "sce", "base_model": str(family["base"]),
                  "models": [{"model": str(family[m])} for m in ("ft1", "ft2", "ft3")],
                  "parameters": {"select_topk": 0.5}}
    mergegate.merge(sce_recipe, tmp_path / "sce")
    AutoModelForCausalLM.from_pretrained(tmp_path / "sce")
    with pytest.raises(RecipeError, match="epsilon"):
        mergegate.merge(recipe_for("della_linear", family, density=0.1), tmp_path / "bad")  # default epsilon 0.15
    mergegate.merge(recipe_for("della_linear", family, density=0.1, epsilon=0.05), tmp_path / "linear")
    AutoModelForCausalLM.from_pretrained(tmp_path / "linear")
