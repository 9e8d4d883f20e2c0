"""SCE (Wan et al. 2024, FuseChat): select, calculate, erase, as mergekit implements it.

Select: with `select_topk` < 1, keep only the elements whose deltas vary most across the models (the
top `select_topk` fraction of the elements with nonzero variance); the rest of every delta is zeroed.
Calculate: each model's weight is the mean square of its (selected) delta, normalised to sum to 1,
or uniform when the squares sum to almost nothing. Erase: elect each element's sign from the plain sum
of the deltas and drop the entries that disagree; the result is the weighted mean of what remains.
There are no per-model parameters: the weights come from the deltas themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _sparsify
from ._registry import NoParams, param, register, work_dtype

_UNIFORM_BELOW = 1e-6  # total mean-square delta under which the weights fall back to uniform (mergekit)
_MIN_DIVISOR = 1e-6  # floor of the agreeing weight at an element (mergekit)


@dataclass(frozen=True)
class SceShared:
    select_topk: float = param(1.0, low=0.0, high=1.0)
    int8_mask: bool = param(False)  # accepted for mergekit recipes; masks are boolean either way


def high_variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Elements (shape of one delta) whose variance across the stacked deltas is in the top `fraction`.

    The count is `fraction` of the elements with nonzero variance, rounded down (so a single model,
    whose variance is zero everywhere, selects nothing). Ties at the threshold are ranked in index order,
    so the later of equal variances are kept, as TIES trimming does (`_sparsify.magnitude`).
    """
    shape = deltas.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool)
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    variance = torch.var(deltas, dim=0, unbiased=False)
    # a tensor product, so float32 rounding, exactly as mergekit counts
    k = int(torch.count_nonzero(variance) * fraction)
    n = variance.numel()
    return _sparsify.rank_window(variance, n - k, n)


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """One weight per model: the mean square of its delta over the sum of them (uniform if that is ~0)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < _UNIFORM_BELOW:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def agreeing(deltas: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries whose sign matches the elected one (sign of the sum; `>= 0` is +).

    A zero entry agrees with neither sign.
    """
    elected_positive = deltas.sum(dim=0) >= 0
    return torch.where(elected_positive, deltas > 0, deltas < 0)


@register("sce", shared=SceShared, per_model=NoParams)
def sce(base, tensors, per_model, shared, rng=None):
    """Variance top-k selection, mean-square weights, sign election, weighted mean of agreeing deltas."""
    if not tensors:
        return base.clone()
    deltas = torch.empty((len(tensors), *base.shape), dtype=work_dtype(base))
    for row, tensor in zip(deltas, tensors):
        torch.sub(tensor, base, out=row)
    if shared.select_topk < 1:
        deltas.mul_(high_variance_mask(deltas, shared.select_topk))
    weights = energy_weights(deltas)
    kept = weights.reshape(-1, *[1] * base.dim()) * agreeing(deltas)  # per-entry weight, 0 where erased
    divisor = kept.sum(dim=0).clamp(min=_MIN_DIVISOR)
    merged = kept.mul_(deltas).sum(dim=0)  # the weights are used up: multiply in place
    del deltas, kept
    return base + merged / divisor
