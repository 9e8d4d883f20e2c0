"""Sparsification of task vectors (deltas), as the TIES/DARE/breadcrumbs papers and mergekit define it.

Magnitude selection finds exact rank thresholds instead of sorting: a seeded sample brackets the k-th
value and `kthvalue` runs only on the elements inside the bracket. That is O(n) with a few passes instead
of mergekit's full argsort per tensor, its main cost on TIES. Elements tied at a threshold are ranked in
ascending index order, so exactly k are kept and a top-k keeps the *later* of equal magnitudes
(mergekit's unstable argsort leaves that choice unspecified; on bf16 deltas, where many magnitudes tie,
the two tools can keep different tied entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_RESCALE_EPS = 1e-7
_SAMPLE = 1 << 16


def kth_smallest(w: torch.Tensor, k: int) -> float:
    """The exact k-th smallest value (1-based) of a flat tensor; exact whatever the sample draws."""
    n = w.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(w, k).values.item()
    draw = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n + k), device="cpu")
    sample = w[draw.to(w.device)]  # drawn on the CPU whatever device `w` is on: the same sample, the same passes
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
            ranks = torch.arange(first_rank, first_rank + tied.numel(), device=w.device)
            mask[tied] = (ranks >= start) & (ranks < stop)
    return mask.reshape(magnitudes.shape)


@dataclass(frozen=True)
class Selection:
    """Which entries of a delta survive (`mask`; None keeps all) and the factor they are then scaled by.

    Kept apart from the delta so that a large tensor's selection can be made once on the whole delta and
    applied row chunk by row chunk (see _task_vectors.combine): a boolean mask costs a quarter of a float32
    delta, and applying it is elementwise.
    """

    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # a 0-dim float tensor; None means 1

    def apply(self, delta: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The kept (and rescaled) entries of `delta`, in place; `rows` when `delta` is a row chunk."""
        if self.mask is not None:
            delta.masked_fill_(~(self.mask if rows is None else self.mask[rows[0]:rows[1]]), 0)
        if self.scale is not None:
            delta.mul_(self.scale)
        return delta


KEEP_ALL = Selection()


def _select(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> Selection:
    """Keep `mask`; with `rescale`, scale the kept entries to restore the delta's L1 norm."""
    if not rescale:
        return Selection(mask)
    magnitudes = delta.abs()
    before = magnitudes.sum()
    after = magnitudes.mul_(mask).sum()  # the kept magnitudes, +0 elsewhere: the same sum in the same order
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return Selection(mask)
    return Selection(mask, before / after)


def _drop_all(delta: torch.Tensor) -> Selection:
    return Selection(torch.zeros(delta.shape, dtype=torch.bool, device=delta.device))


def _uniform(delta: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One uniform draw per entry of `delta`, from `rng` on its own device (the CPU's, as the engine seeds it),
    then moved to `delta`'s: a merge on a GPU keeps exactly the entries the CPU path keeps."""
    draw = torch.rand(delta.shape, generator=rng, dtype=torch.float32, device=rng.device if rng is not None else "cpu")
    return draw.to(delta.device)


def magnitude_selection(delta: torch.Tensor, density: float, rescale: bool = False) -> Selection:
    """Keep the `density` fraction of largest-magnitude entries (at least one when density > 0)."""
    if density >= 1:
        return KEEP_ALL
    n = delta.numel()
    if density <= 0 or n == 0:
        return _drop_all(delta)
    k = max(1, int(density * n))
    return _select(delta, top_k_mask(delta.abs(), k), rescale)


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """`rank_window(magnitudes, n - k, n)` in fewer passes: everything above the threshold, then of the entries
    equal to it the later ones (ascending rank in index order), so exactly k."""
    w = magnitudes.reshape(-1)
    if k >= w.numel():
        return torch.ones_like(magnitudes, dtype=torch.bool)
    threshold = kth_smallest(w, w.numel() - k + 1)
    mask = w > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing:
        tied = (w == threshold).nonzero().reshape(-1)
        mask[tied[tied.numel() - missing:]] = True
    return mask.reshape(magnitudes.shape)


def random_selection(delta: torch.Tensor, density: float, rescale: bool, rng: torch.Generator | None) -> Selection:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return KEEP_ALL
    if density <= 0:
        return _drop_all(delta)
    mask = _uniform(delta, rng) < density
    return _select(delta, mask, rescale)


def outliers_selection(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> Selection:
    """Breadcrumbs: drop the top `gamma` fraction (outliers), then the smallest, keeping `density`."""
    if density >= 1:
        return KEEP_ALL
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)  # fewer outliers are dropped when density needs them
    return _select(delta, rank_window(delta.abs(), n_bottom, n_bottom + target), rescale)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """`magnitude_selection` applied to `delta` (in place when anything is dropped)."""
    return magnitude_selection(delta, density, rescale).apply(delta)


def random(delta: torch.Tensor, density: float, rescale: bool, rng: torch.Generator | None) -> torch.Tensor:
    return random_selection(delta, density, rescale, rng).apply(delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    return outliers_selection(delta, density, gamma, rescale).apply(delta)


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


def della_selection(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                    rng: torch.Generator | None) -> Selection:
    """DELLA MagPrune: keep each entry with its rank-based probability (see `della_keep_probabilities`).

    With `rescale`, the kept entries are scaled to restore the delta's L1 norm (mergekit's rescale), not
    by each entry's 1 / keep-probability as in the paper; the two roughly agree only at `epsilon` 0.
    """
    if density >= 1:
        return KEEP_ALL
    if density <= 0:
        return _drop_all(delta)
    check_della_window(density, epsilon)
    probabilities = della_keep_probabilities(delta.abs(), density, epsilon)
    mask = _uniform(delta, rng) < probabilities
    return _select(delta, mask, rescale)


def della(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
          rng: torch.Generator | None) -> torch.Tensor:
    return della_selection(delta, density, epsilon, rescale, rng).apply(delta)
