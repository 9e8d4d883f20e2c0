"""Sparsification of task vectors (deltas), as the TIES/DARE/breadcrumbs papers and mergekit define it.

Magnitude selection finds exact rank thresholds instead of sorting: a seeded sample brackets the k-th
value and `kthvalue` runs only on the elements inside the bracket. That is O(n) with a few passes instead
of mergekit's full argsort per tensor, its main cost on TIES. Elements tied at a threshold are ranked in
ascending index order, so exactly k are kept and a top-k keeps the *later* of equal magnitudes
(mergekit's unstable argsort leaves that choice unspecified; on bf16 deltas, where many magnitudes tie,
the two tools can keep different tied entries).
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


def check_della_window(density: float, epsilon: float) -> None:
    """Refuse a DELLA window that puts keep probabilities outside (0, 1), as mergekit does.

    Only checked when something is dropped at all (0 < density < 1): density 1 keeps everything and
    density 0 drops everything whatever `epsilon` says.
    """
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"della: density {density} with epsilon {epsilon} puts keep probabilities outside (0, 1); "
            f"density - epsilon and density + epsilon must both lie strictly between 0 and 1 "
            f"(use epsilon < {min(density, 1 - density):g})"
        )


def della_keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability of DELLA's MagPrune, in float32.

    Within each row (dim 1; a tensor of fewer than 2 dims is one row) entries are ranked by magnitude;
    the smallest gets `density - epsilon`, the largest `density + epsilon`, linear in rank between.
    Equal magnitudes are ranked in index order, so the result never depends on the sort's whims. A row of
    one entry gets `density` (its rank is both the smallest and the largest).
    """
    rows = magnitudes.reshape(1, -1) if magnitudes.dim() < 2 else magnitudes
    n = rows.shape[1]
    if n == 0:
        return torch.empty(magnitudes.shape, dtype=torch.float32)
    # mergekit's arithmetic, in float32, on 1-based ranks: the same bits for the same rank
    ranks = torch.arange(1, n + 1).to(torch.float32)
    if n > 1:
        spread = ((ranks - ranks[0]) / (ranks[-1] - ranks[0])).clamp(0, 1)
    else:
        spread = torch.full_like(ranks, 0.5)
    by_rank = (density - epsilon) + spread * 2 * epsilon
    order = torch.argsort(rows, dim=1, stable=True)
    view = [1] * rows.dim()
    view[1] = n
    probabilities = torch.empty(rows.shape, dtype=torch.float32)
    probabilities.scatter_(1, order, by_rank.reshape(view).expand(rows.shape))
    return probabilities.reshape(magnitudes.shape)


def della(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, rng: torch.Generator | None
) -> torch.Tensor:
    """DELLA MagPrune: keep each entry with its rank-based probability (see `della_keep_probabilities`).

    With `rescale`, the kept entries are scaled to restore the delta's L1 norm (mergekit's rescale), not
    by each entry's 1 / keep-probability as in the paper; the two roughly agree only at `epsilon` 0.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della_window(density, epsilon)
    probabilities = della_keep_probabilities(delta.abs(), density, epsilon)
    mask = torch.rand(delta.shape, generator=rng, dtype=torch.float32) < probabilities
    return _keep(delta, mask, rescale)
