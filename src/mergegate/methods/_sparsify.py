"""Sparsification of task vectors (deltas), as the TIES/DARE/breadcrumbs papers and mergekit define it.

Magnitude selection finds exact rank thresholds instead of sorting: a seeded sample brackets the k-th
value and `kthvalue` runs only on the elements inside the bracket. That is O(n) with a few passes instead
of mergekit's full argsort per tensor, its main cost on TIES. Elements tied at a threshold are taken in
index order, so exactly k are kept, as with a sort.
"""

from __future__ import annotations

import torch

_RESCALE_EPS = 1e-7
_SAMPLE = 1 << 16


def kth_smallest(w: torch.Tensor, k: int) -> float:
    """The exact k-th smallest value (1-based) of a flat tensor; exact whatever the sample draws."""
    n = w.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(w, k).values.item()
    sample = w[torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n + k))]
    q = k / n
    margin = 6 * (q * (1 - q) / _SAMPLE) ** 0.5 + 2 / _SAMPLE
    lo = torch.kthvalue(sample, int((q - margin) * _SAMPLE)).values.item() if q - margin > 1 / _SAMPLE else None
    hi = torch.kthvalue(sample, int((q + margin) * _SAMPLE) + 1).values.item() if q + margin < 1 - 1 / _SAMPLE else None
    band = _between(w, lo, hi)
    below = int(torch.count_nonzero(w < lo)) if lo is not None else 0
    inside = w[band]
    rank = k - below
    if 1 <= rank <= inside.numel():
        return torch.kthvalue(inside, rank).values.item()
    return torch.kthvalue(w, k).values.item()  # the bracket missed: rare, still exact


def _between(w: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    if lo is not None and hi is not None:
        return (w >= lo) & (w <= hi)
    if lo is not None:
        return w >= lo
    if hi is not None:
        return w <= hi
    return torch.ones_like(w, dtype=torch.bool)


def rank_window(magnitudes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean mask of the elements whose ascending rank lies in [start, stop)."""
    w = magnitudes.reshape(-1)
    n = w.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    lo = kth_smallest(w, start + 1) if start > 0 else None
    hi = kth_smallest(w, stop) if stop < n else None
    mask = _between(w, lo, hi)
    if int(torch.count_nonzero(mask)) != stop - start:  # ties at an edge: keep them in index order
        for value in {v for v in (lo, hi) if v is not None}:
            tied = (w == value).nonzero().reshape(-1)
            first_rank = int(torch.count_nonzero(w < value))
            ranks = torch.arange(first_rank, first_rank + tied.numel())
            mask[tied] = (ranks >= start) & (ranks < stop)
    return mask.reshape(magnitudes.shape)


def _keep(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero the entries outside `mask` (in place); with `rescale`, restore the delta's L1 norm."""
    before = delta.abs().sum() if rescale else None
    kept = delta.masked_fill_(~mask, 0)
    if not rescale:
        return kept
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `density` fraction of largest-magnitude entries (at least one when density > 0)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    return _keep(delta, rank_window(delta.abs(), n - k, n), rescale)


def random(delta: torch.Tensor, density: float, rescale: bool, rng: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = torch.rand(delta.shape, generator=rng, dtype=torch.float32) < density
    return _keep(delta, mask, rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the top `gamma` fraction (outliers), then the smallest, keeping `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)  # fewer outliers are dropped when density needs them
    return _keep(delta, rank_window(delta.abs(), n_bottom, n_bottom + target), rescale)
