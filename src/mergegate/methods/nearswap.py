"""NearSwap: take the other model's value wherever it is close to the base's, and keep the base elsewhere.

Each element moves from the base towards the other model by weight = clamp(t / |base - other|, 0, 1): fully
where the two differ by at most t, proportionally less the further apart they are. t = 0 (or less) keeps the
base. Differences are floored at 1e-6 before dividing. As mergekit 0.1.5.

Element-wise: each output element depends only on the same element of the two inputs, so the engine may
merge a large tensor in row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._registry import param, register

DIFF_FLOOR = 1e-6


@dataclass(frozen=True)
class NearSwapShared:
    t: float = param()


@register("nearswap", shared=NearSwapShared, min_models=1, max_models=1, elementwise=True)
def nearswap(base, tensors, per_model, shared: NearSwapShared, rng=None) -> torch.Tensor:
    """Swap in the other model's values where they lie within about t of the base's."""
    other = tensors[0].to(base.dtype)
    weight = (shared.t / (base - other).abs_().clamp_(min=DIFF_FLOOR)).clamp_(0, 1)
    return weight * other + (1 - weight) * base  # exact base at weight 0, exact other at weight 1
