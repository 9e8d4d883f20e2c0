"""Passthrough: copy one model's tensor, optionally scaled — with `slices`, it stacks layer ranges (depth up-scaling)."""

from dataclasses import dataclass

import torch

from ._registry import NoParams, param, register, work_dtype


@dataclass(frozen=True)
class PassthroughModel:
    scale: float = param(None)  # None leaves the stored bytes untouched


@register("passthrough", shared=NoParams, per_model=PassthroughModel, base="ignored", per_model_scope="input",
          min_models=1, max_models=1, elementwise=True)
def passthrough(base, tensors, per_model, shared, rng=None) -> torch.Tensor:
    """The single input as is, or multiplied by `scale`."""
    tensor, scale = tensors[0], per_model[0].scale
    if scale is None:
        return tensor.clone()
    return tensor.to(work_dtype(tensor)) * scale
