"""Linear / model soup (Wortsman et al. 2022): a weighted average of the inputs."""

from dataclasses import dataclass

import torch

from ._registry import param, register, work_dtype


@dataclass(frozen=True)
class LinearShared:
    normalize: bool = param(True)


@dataclass(frozen=True)
class LinearModel:
    weight: float = param()


@register("linear", shared=LinearShared, per_model=LinearModel, base="ignored", per_model_scope="input",
          elementwise=True)
def linear(base, tensors, per_model, shared: LinearShared, rng=None) -> torch.Tensor:
    """Weighted average of every input; a base_model not listed in models is an input too (as mergekit)."""
    total = torch.zeros(tensors[0].shape, dtype=work_dtype(tensors[0]))
    weight_sum = 0.0
    for tensor, params in zip(tensors, per_model):
        total.add_(tensor, alpha=params.weight)
        weight_sum += params.weight
    if shared.normalize:
        if weight_sum == 0:
            raise ValueError("linear: the weights sum to 0, so they cannot be normalized (set normalize: false)")
        total.div_(weight_sum)
    return total
