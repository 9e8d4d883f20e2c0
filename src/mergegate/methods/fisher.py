"""Fisher merging (Matena & Raffel 2022): each parameter averaged with weights w_i·F_i, F_i the diagonal
Fisher information of model i on the recipe's calibration text (see mergegate.calibration).

θ* = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i, with F̃_i = F_i + fisher_floor · max_j F_j elementwise. The floor is
relative to the largest Fisher at that element, so the merge does not change when every Fisher is scaled
(they are per-token averages whose size depends on the model and the text), and the method stays
elementwise; it keeps a model whose Fisher underflowed to 0 from being silenced by a tiny other one.
Where every model's Fisher is 0 (e.g. embedding rows of tokens the calibration text never uses), or a
tensor has no statistics, the result is the plain weighted average Σ w_i θ_i / Σ w_i.

Like linear, every model is an input, and so is a `base_model` that `models` does not list (mergekit's rule
for every method; it then needs calibration text like the others). It also supplies the config and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._registry import param, register, work_dtype


@dataclass(frozen=True)
class FisherShared:
    fisher_floor: float = param(1e-6, low=0.0)


@dataclass(frozen=True)
class FisherModel:
    weight: float = param(1.0, low=0.0)


def weighted_average(tensors, weights) -> torch.Tensor:
    """Σ w_i x_i / Σ w_i in the inputs' work dtype; refuses weights that sum to 0."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("the model weights sum to 0, so no average exists")
    out = torch.zeros(tensors[0].shape, dtype=work_dtype(tensors[0]))
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor, alpha=weight)
    return out.div_(total)


@register("fisher", shared=FisherShared, per_model=FisherModel, base="ignored", per_model_scope="input",
          elementwise=True, statistics="fisher")
def fisher(base, tensors, per_model, shared: FisherShared, rng=None, *, stats=None) -> torch.Tensor:
    """Fisher-weighted average of every input (needs a calibration section); base_model counts as an input."""
    weights = [p.weight for p in per_model]
    if stats is None or any(s is None for s in stats):
        return weighted_average(tensors, weights)
    if sum(weights) <= 0:
        raise ValueError("the model weights sum to 0, so no average exists")
    for position, (tensor, stat) in enumerate(zip(tensors, stats)):
        if stat.shape != tensor.shape:
            raise ValueError(f"the Fisher of input {position} has shape {list(stat.shape)}, "
                             f"the tensor {list(tensor.shape)}")
    # float64: Fishers of rarely used parameters are tiny, and their products with weights must not underflow
    fishers = [s.to(torch.float64).clamp_min(0) for s in stats]
    floor = torch.stack(fishers).amax(dim=0).mul_(shared.fisher_floor)
    numerator = torch.zeros(tensors[0].shape, dtype=torch.float64)
    denominator = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, fisher_, weight in zip(tensors, fishers, weights):
        importance = (fisher_ + floor).mul_(weight)
        numerator.addcmul_(importance, tensor.to(torch.float64))
        denominator.add_(importance)
    merged = numerator.div_(denominator.where(denominator > 0, torch.ones_like(denominator)))
    uninformed = denominator <= 0
    if bool(uninformed.any()):
        merged = torch.where(uninformed, weighted_average(tensors, weights).to(torch.float64), merged)
    return merged.to(work_dtype(tensors[0]))
