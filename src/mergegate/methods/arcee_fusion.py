"""Arcee Fusion: keep the other model's change only where it matters most, the base elsewhere.

Each element's importance is |other - base| times the KL divergence, along the last dimension, between the
softmax of the other model's vector and the base's (each plus 1e-8); a 1-D tensor is one vector. Changes whose
importance reaches median + 1.5·(Q3 - Q1) of all importances in the tensor are taken, the rest dropped.
Quartiles are order statistics: the value at sorted index floor(q·(n-1)).

mergekit 0.1.5 estimates the quartiles from 1,000,000 elements drawn at random (unseeded) when a tensor is
larger than that; mergegate computes them exactly on any size, which equals mergekit's result up to
1,000,000 elements and is what its estimate approximates above that, reproducibly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import register
from ._sparsify import kth_smallest

KL_EPS = 1e-8
IQR_FACTOR = 1.5


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other - base| times KL(softmax(other) + eps || softmax(base) + eps) of its vector (last dimension)."""
    p = F.softmax(other, dim=-1) + KL_EPS
    q = F.softmax(base, dim=-1) + KL_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(divergence)


def quantile_index(q_numerator: int, q_denominator: int, n: int) -> int:
    """floor(q·(n-1)) for q = numerator/denominator, in exact integer arithmetic."""
    return q_numerator * (n - 1) // q_denominator


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 - Q1) of all `scores`, quartiles taken as order statistics at floor(q·(n-1))."""
    flat = scores.reshape(-1)
    n = flat.numel()
    quartiles = [kth_smallest(flat, quantile_index(k, 4, n) + 1) for k in (1, 2, 3)]
    q1, median, q3 = torch.tensor(quartiles, dtype=scores.dtype)  # the arithmetic in the scores' precision
    return median + IQR_FACTOR * (q3 - q1)


@register("arcee_fusion", min_models=1, max_models=1)
def arcee_fusion(base, tensors, per_model, shared, rng=None) -> torch.Tensor:
    """Take the other model's changes whose importance (size times KL of the softmaxed rows) is an outlier."""
    other = tensors[0].to(base.dtype)
    scores = importance(other, base)
    keep = scores >= outlier_threshold(scores)
    del scores
    return base + (other - base) * keep  # rather than where(): mergekit's rounding of base + delta
