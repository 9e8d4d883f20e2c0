"""Each method against hand-computed expectations on small tensors, plus edge cases."""

from __future__ import annotations

import pytest
import torch

from mergegate.errors import RecipeError
from mergegate.methods import NonFiniteInput, available_methods, get_method
from mergegate.methods._sparsify import kth_smallest, magnitude, magnitude_outliers, rank_window


def run(name, base, tensors, per_model=None, rng=None, **shared):
    method = get_method(name)
    per_model = per_model or [{"weight": 1.0}] * len(tensors)
    model_params = [method.per_model(**p) for p in per_model] if method.per_model_params else [method.per_model()] * len(tensors)
    shared = {("lambda_" if k == "lambda" else k): v for k, v in shared.items()}
    return method(base, tensors, model_params, method.shared(**shared), rng)


T = lambda *values: torch.tensor(values, dtype=torch.float32)  # noqa: E731


def test_registry_lists_the_issue_methods_and_refuses_unknown_names():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs"} <= set(
        available_methods())
    with pytest.raises(RecipeError, match="unknown method 'tie'.*available: .*ties"):
        get_method("tie")


def test_defaults_match_mergekit():
    """mergekit 0.1.5's declared defaults (shared/notes/mergekit-0.1.5-method-parameters.txt)."""
    defaults = lambda name: {p.name: p.default for p in get_method(name).shared_params}  # noqa: E731
    assert defaults("linear") == {"normalize": True}
    assert defaults("task_arithmetic") == {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
    assert defaults("ties") == {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}
    assert defaults("dare_ties")["rescale"] is True and defaults("dare_ties")["normalize"] is False
    assert defaults("dare_linear")["rescale"] is True
    per_model = {p.name: p.default for p in get_method("breadcrumbs").per_model_params}
    assert per_model["density"] == 1.0 and per_model["gamma"] == 0.01
    assert get_method("ties").per_model_params[0].required  # weight has no default, as in mergekit


def test_linear_weighted_average():
    a, b = T(1, 2), T(3, 4)
    assert torch.equal(run("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}]), T(2.5, 3.5))
    assert torch.equal(run("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], normalize=False), T(10, 14))


def test_linear_refuses_weights_that_sum_to_zero():
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", None, [T(1.0), T(2.0)], [{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_adds_weighted_deltas_scaled_by_lambda():
    base, a, b = T(0, 0), T(1, -1), T(2, 1)
    got = run("task_arithmetic", base, [a, b], [{"weight": 1.0}, {"weight": 0.5}], **{"lambda": 0.5})
    assert torch.allclose(got, T(1.0, -0.25))  # (1 + 0.5*2, -1 + 0.5*1) * 0.5
    got = run("task_arithmetic", base, [a, b], [{"weight": 1.0}, {"weight": 0.5}], normalize=True)
    assert torch.allclose(got, T(2.0, -0.5) / 1.5)


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(4)
    a, b = T(3, -2, 1, 0), T(-1, -4, 2, 5)
    # weighted sum [2, -6, 3, 5] elects + - + +; agreeing entries are averaged, zeros count nowhere
    assert torch.equal(run("ties", base, [a, b]), T(3, -3, 1.5, 5))


def test_ties_trims_to_density_before_electing():
    base = torch.zeros(4)
    a, b = T(3, -2, 1, 0), T(-1, -4, 2, 5)
    per_model = [{"weight": 1.0, "density": 0.5}] * 2
    # a keeps [3, -2, 0, 0], b keeps [0, -4, 0, 5]; column 3 has no agreeing entry: divisor 1, result 0
    assert torch.equal(run("ties", base, [a, b], per_model), T(3, -3, 0, 5))


def test_ties_opposite_signs_cancel_to_the_stronger_side():
    base = T(1.0)
    got = run("ties", base, [T(3.0), T(0.0)], [{"weight": 1.0}, {"weight": 1.0}])  # deltas +2 and -1
    assert torch.equal(got, T(3.0))  # only the +2 agrees with the elected sign


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                  "breadcrumbs_ties"])
def test_zero_deltas_return_the_base(name):
    base = torch.randn(50)
    per_model = [{"weight": 0.7, "density": 0.5}] * 2
    got = run(name, base, [base.clone(), base.clone()], per_model, rng=torch.Generator().manual_seed(0))
    assert torch.equal(got, base)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs"])
def test_density_zero_drops_every_delta(name):
    base = torch.randn(50)
    got = run(name, base, [torch.randn(50)], [{"weight": 1.0, "density": 0.0}], rng=torch.Generator())
    assert torch.equal(got, base)


def test_density_one_means_no_sparsification():
    base, a, b = torch.randn(40), torch.randn(40), torch.randn(40)
    full = [{"weight": 1.0, "density": 1.0}] * 2
    assert torch.equal(run("dare_linear", base, [a, b], full, rng=torch.Generator()),
                       run("task_arithmetic", base, [a, b], full))
    assert torch.equal(run("dare_ties", base, [a, b], full, rng=torch.Generator()),
                       run("ties", base, [a, b], full, normalize=False))


def test_dare_is_seeded_and_rescale_restores_l1_norm():
    base, a = torch.zeros(10_000), torch.randn(10_000)
    per_model = [{"weight": 1.0, "density": 0.3}]
    first = run("dare_linear", base, [a], per_model, rng=torch.Generator().manual_seed(7))
    again = run("dare_linear", base, [a], per_model, rng=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    kept = float((first != 0).float().mean())
    assert abs(kept - 0.3) < 0.02
    assert torch.allclose(first.abs().sum(), a.abs().sum(), rtol=1e-4)
    plain = run("dare_linear", base, [a], per_model, rng=torch.Generator().manual_seed(7), rescale=False)
    assert torch.equal(plain != 0, first != 0) and torch.equal(plain, a * (plain != 0))


def test_breadcrumbs_drops_outliers_and_small_entries():
    delta = torch.arange(1, 101, dtype=torch.float32)
    got = run("breadcrumbs", torch.zeros(100), [delta], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    expected = torch.where((delta > 40) & (delta <= 90), delta, torch.zeros(()))  # ranks 40..89 kept
    assert torch.equal(got, expected)


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    a, b = T(1, 0), T(0, 1)
    assert torch.allclose(run("slerp", a, [b], t=0.0), a)
    assert torch.allclose(run("slerp", a, [b], t=1.0), b)
    half = 2 ** -0.5
    assert torch.allclose(run("slerp", a, [b], t=0.5), T(half, half))  # on the arc, not the chord
    parallel = run("slerp", T(1, 1), [T(2, 2)], t=0.25)
    assert torch.allclose(parallel, T(1.25, 1.25))  # |cos| > 0.9995: linear interpolation


def test_nan_input_is_an_error_naming_the_input():
    base = torch.zeros(3)
    bad = T(1, float("nan"), 2)
    with pytest.raises(NonFiniteInput) as info:
        run("ties", base, [torch.ones(3), bad])
    assert info.value.index == 1
    with pytest.raises(NonFiniteInput) as info:
        run("linear", None, [T(float("inf"))])
    assert info.value.index == 0


def test_kth_smallest_is_exact_on_large_tensors_with_ties():
    w = torch.randn(400_000).abs()
    w[::5] = 0.25
    for k in (1, 17, 80_000, 200_000, 399_999, 400_000):
        assert kth_smallest(w, k) == torch.kthvalue(w, k).values.item()


def test_rank_window_keeps_exactly_the_requested_count_with_ties():
    w = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 2.0, 4.0])
    mask = rank_window(w, 2, 5)  # ascending ranks: 1, 2, 3, 3, 3, 4, 5 -> ranks 2..4 are the three 3s
    assert mask.tolist() == [False, False, True, True, True, False, False]
    mask = rank_window(w, 3, 6)  # the last two 3s and the 4
    assert int(mask.sum()) == 3 and mask[6] and not mask[2]


def test_magnitude_matches_an_argsort_reference():
    delta = torch.randn(300_000)
    for density in (0.05, 0.3, 0.77):
        k = int(density * delta.numel())
        reference = torch.zeros_like(delta)
        top = torch.argsort(delta.abs(), descending=True)[:k]
        reference[top] = delta[top]
        assert torch.equal(magnitude(delta.clone(), density), reference)
    assert int((magnitude_outliers(delta.clone(), 0.5, 0.01) != 0).sum()) == 150_000


@pytest.mark.parametrize("name, shared, per_model", [
    ("ties", {}, {"weight": 0.7, "density": 0.3}),
    ("ties", {"rescale": True, "lambda": 0.8}, {"weight": 1.0, "density": 0.5}),
    ("dare_ties", {}, {"weight": 0.5, "density": 0.4}),
    ("dare_linear", {"normalize": True}, {"weight": 0.5, "density": 0.4}),
    ("breadcrumbs_ties", {"rescale": True}, {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
    ("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2}),
    ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
])
def test_large_tensors_take_the_two_pass_path_with_identical_bytes(name, shared, per_model, monkeypatch):
    """Above CHUNK_ELEMENTS the task-vector family chooses entries on whole deltas, then merges row chunks."""
    from mergegate.methods import _task_vectors

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(301, 40, generator=generator)
    models = [(base + 0.1 * torch.randn(301, 40, generator=generator)).to(torch.bfloat16) for _ in range(3)]
    models[1][5:9] = base[5:9].to(torch.bfloat16)  # rows where a model did not move

    def merged():
        rng = torch.Generator().manual_seed(11)
        return run(name, base, models, [per_model] * 3, rng=rng, **shared)

    monkeypatch.setattr(_task_vectors, "CHUNK_ELEMENTS", 1 << 30)
    whole = merged()
    monkeypatch.setattr(_task_vectors, "CHUNK_ELEMENTS", 7 * 40)  # 7-row chunks, the last one short
    assert torch.equal(merged(), whole)


def test_large_slerp_takes_two_passes_and_agrees_with_the_whole_tensor_form(monkeypatch):
    from mergegate.methods import slerp as slerp_module

    generator = torch.Generator().manual_seed(5)
    a = torch.randn(203, 30, generator=generator)
    for b in ((a + 0.8 * torch.randn(203, 30, generator=generator)).to(torch.bfloat16),  # curved branch
              (a * 1.5).to(torch.bfloat16)):  # parallel: linear fallback
        whole = run("slerp", a, [b], t=0.3)
        monkeypatch.setattr(slerp_module, "CHUNK_ELEMENTS", 9 * 30)
        chunked = run("slerp", a, [b], t=0.3)
        monkeypatch.setattr(slerp_module, "CHUNK_ELEMENTS", 1 << 22)
        worst = (chunked - whole).abs().max().item()
        assert worst < 1e-5, f"max abs diff {worst:.3g}"
        assert chunked.dtype == torch.float32 and chunked.shape == a.shape
