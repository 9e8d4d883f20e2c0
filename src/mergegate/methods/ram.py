"""RAM, Reinforced Agent Merging (arXiv:2601.13572), and its tensor-local RAM+ variant (`ramplus_tl`).

A delta entry counts as changed when |model - base| > epsilon. Where exactly one model changed an entry its
delta is taken whole; where several did, their changed deltas are averaged (unchanged models do not dilute
the average); where none did, the base stays. RAM+ also scales each model's uniquely changed entries by
1 + r·clamp(shared/unique, 0, alpha), where shared and unique count that model's changed entries in this
tensor that other models changed too, or that only it changed. As mergekit 0.1.5.

`ram` is element-wise (each output element depends only on the same element of the inputs); `ramplus_tl` is
not, since its scale counts entries over the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._geometry import compute_dtype
from ._registry import param, register


@dataclass(frozen=True)
class RamShared:
    epsilon: float = param(1e-5, low=0.0)


@dataclass(frozen=True)
class RamPlusShared:
    r: float = param(0.1)
    alpha: float = param(0.2, low=0.0)  # the upper clamp of shared/unique, whose lower one is 0
    epsilon: float = param(1e-5, low=0.0)


def _changed(base: torch.Tensor, tensor: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's delta with unchanged entries zeroed, and the mask of changed entries."""
    delta = torch.sub(tensor.to(base.dtype), base)
    changed = delta.abs() > epsilon
    return delta.masked_fill_(~changed, 0), changed


def _contributors(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """How many models changed each entry."""
    count = torch.zeros(base.shape, dtype=torch.int32)
    for tensor in tensors:
        count.add_(_changed(base, tensor, epsilon)[1])
    return count


def unique_boost(changed: torch.Tensor, count: torch.Tensor, shared: RamPlusShared) -> torch.Tensor | None:
    """1 + r·clamp(shared/unique, 0, alpha) for one model's mask of changed entries (None: no unique entry)."""
    unique = int(torch.count_nonzero(changed & (count == 1)))
    if unique == 0:
        return None  # nothing to scale (and shared/unique would divide by epsilon, which may be 0)
    overlapping = int(torch.count_nonzero(changed & (count > 1)))
    ratio = torch.tensor(overlapping, dtype=torch.float32) / max(unique, shared.epsilon)  # float32, as mergekit
    return 1 + shared.r * ratio.clamp(min=0, max=shared.alpha)


def _merge(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float,
           boost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """base + the sum over models of their changed deltas, divided by how many models changed each entry;
    `boost(changed, count)` scales a model's uniquely changed entries."""
    base = base.to(compute_dtype(base, tensors))
    count = _contributors(base, tensors, epsilon)
    divisor = count.clamp(min=1).to(base.dtype)
    total = torch.zeros_like(base)
    for tensor in tensors:
        delta, changed = _changed(base, tensor, epsilon)
        scale = boost(changed, count) if boost is not None else None
        contribution = delta.div_(divisor)  # divisor 1 on entries one model changed: those stay exact
        if scale is not None:
            contribution = torch.where(count == 1, contribution * scale.to(base.dtype), contribution)
        total += contribution
    return base + total


@register("ram", shared=RamShared, min_models=0, elementwise=True)
def ram(base, tensors, per_model, shared: RamShared, rng=None) -> torch.Tensor:
    """Add each changed entry's delta, averaged over the models that changed it."""
    return _merge(base, tensors, shared.epsilon)


@register("ramplus_tl", shared=RamPlusShared, min_models=0)
def ramplus_tl(base, tensors, per_model, shared: RamPlusShared, rng=None) -> torch.Tensor:
    """RAM with each model's uniquely changed entries scaled up by how much it overlaps with the others."""
    return _merge(base, tensors, shared.epsilon, lambda changed, count: unique_boost(changed, count, shared))
