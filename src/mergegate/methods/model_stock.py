"""Model Stock (Jang et al. 2024, arXiv:2403.19522): move from the base towards the fine-tunes' average by a
ratio set by the angle between the fine-tunes' deltas.

With k fine-tunes whose deltas from the base meet at mean pairwise cosine c, the interpolation ratio is
t = k·c / (1 + (k-1)·c) and the result is t·average + (1-t)·base. Identical fine-tunes (c = 1) give their
average; orthogonal ones (c = 0) give the base. Where 1 + (k-1)·c vanishes (opposing deltas) there is no
finite estimate and the base is kept. `filter_wise` computes one ratio per row (per vector along the last
dimension) instead of one per tensor; a 1-D tensor is a single row either way. As mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._geometry import compute_dtype, offsets
from ._registry import param, register

NORM_FLOOR = 1e-6  # smallest norm product a cosine is divided by
SINGULAR = 1e-6  # |1 + (k-1)·c| below this keeps the base


@dataclass(frozen=True)
class ModelStockShared:
    filter_wise: bool = param(False)


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of cos(vectors[i], vectors[j]) along the last dimension (each clamped to [-1, 1])."""
    norms = [torch.linalg.vector_norm(v, dim=-1) for v in vectors]
    cosines = []
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            dot = (vectors[i] * vectors[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def interpolation_ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """t = k·c / (1 + (k-1)·c), and 0 (keep the base) where the denominator is about 0."""
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < SINGULAR
    ratio = count * cosine / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(ratio), ratio)


@register("model_stock", shared=ModelStockShared, min_models=2)
def model_stock(base, tensors, per_model, shared: ModelStockShared, rng=None) -> torch.Tensor:
    """Interpolate from the base to the fine-tunes' average by a ratio set by the angle between their deltas."""
    dtype = compute_dtype(base, tensors)
    shape = base.shape
    # A tensor is one vector, or with filter_wise one vector per row; 1-D tensors are always one row.
    as_rows = (lambda x: x.reshape(1, -1)) if base.dim() <= 1 else (lambda x: x)
    view = as_rows if shared.filter_wise else (lambda x: x.reshape(-1))
    w0 = view(base.to(dtype))
    ratio = interpolation_ratio(mean_pairwise_cosine([view(d) for d in offsets(base, tensors, dtype)]), len(tensors))
    ratio = ratio.unsqueeze(-1)
    total = torch.zeros_like(w0)
    for tensor in tensors:
        total.add_(view(tensor.to(dtype)))
    average = total / len(tensors)
    return (ratio * average + (1 - ratio) * w0).reshape(shape)
