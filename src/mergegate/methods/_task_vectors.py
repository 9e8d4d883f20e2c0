"""The task-vector family (task arithmetic, TIES, DARE, breadcrumbs) is one algorithm.

delta_i = model_i - base, optionally sparsified, weighted; optionally only entries agreeing with the
elected sign of the weighted sum are kept (`>= 0` counts as +); summed; divided by the sum of the
(kept) weights when `normalize`; scaled by `lambda`; added back to the base.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Sparsifier = Callable[[torch.Tensor, object, bool, "torch.Generator | None"], torch.Tensor]


def combine(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    per_model: Sequence[object],
    shared: object,
    rng: torch.Generator | None,
    *,
    sparsify: Sparsifier | None = None,
    sign_consensus: bool = False,
) -> torch.Tensor:
    if not tensors:
        return base.clone()
    weighted = []
    for tensor, params in zip(tensors, per_model):
        delta = torch.sub(tensor, base)  # a stored bf16 input promotes to the base's float32 here, uncopied
        if sparsify is not None:
            delta = sparsify(delta, params, shared.rescale, rng)
        weighted.append(delta.mul_(params.weight))  # delta is always a fresh tensor here
    weights = [params.weight for params in per_model]

    if sign_consensus:
        elected_positive = _sum(weighted) >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(weighted, weights):
            # sign(0) matches neither side, so zeroed entries count in neither sum nor divisor
            agrees = torch.where(elected_positive, delta > 0, delta < 0)
            divisor.add_(agrees, alpha=weight)
            mixed.add_(delta.masked_fill_(~agrees, 0))  # the delta is ours and used up: mask it in place
        divisor[divisor == 0] = 1
    else:
        mixed = _sum(weighted)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0

    if shared.normalize:
        mixed = mixed / divisor
    if shared.lambda_ != 1:
        mixed = mixed * shared.lambda_
    return base + mixed


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in order without stacking (same accumulation order as a sum over a stacked first dim)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total
