"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere, optionally of their
task vectors (with a base, the deltas are interpolated and the base added back).

mergekit 0.1.5 projects the unit directions onto the tangent space at their weighted mean direction m,
averages them there with the weights and maps the average back with the exponential map. That tangent
average is zero by construction (sum_i w_i (u_i - (u_i·m) m) = M - (M·m) m = 0 for M = sum_i w_i u_i and
m = M/|M|), so the result is m scaled by the weighted mean of the norms; this module computes that
directly, which agrees with mergekit to float rounding. Directions are x/(|x| + eps). A single model is
returned as is. When the weighted directions cancel (|M| < eps), two models fall back to their weighted
sum and more are an error, as in mergekit — except when every input equals the base (all deltas zero, e.g.
frozen embeddings), which returns the base where mergekit raises; weights summing to 0 with `normalize_weights` are an error
(mergekit would write NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._geometry import add_base, compute_dtype, offsets
from ._registry import param, register


@dataclass(frozen=True)
class MultiSlerpShared:
    normalize_weights: bool = param(True)
    eps: float = param(1e-8, low=0.0)


@dataclass(frozen=True)
class MultiSlerpModel:
    weight: float = param()


def barycentre_on_sphere(vectors: list[torch.Tensor], weights: list[float], eps: float) -> torch.Tensor | None:
    """The weighted mean direction of `vectors`, scaled by the weighted mean of their norms.

    None when the weighted unit directions cancel out (their sum's norm is below `eps`, or 0).
    """
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    direction = torch.zeros_like(vectors[0])
    for vector, norm, weight in zip(vectors, norms, weights):
        if norm.item() + eps > 0:  # a zero vector has no direction (and eps may be 0)
            direction.add_(vector, alpha=weight / (norm.item() + eps))
    length = torch.linalg.vector_norm(direction)
    if length < eps or length == 0:
        return None
    scale = sum(weight * norm for weight, norm in zip(weights, norms))
    return direction.mul_(scale / length)


@register("multislerp", shared=MultiSlerpShared, per_model=MultiSlerpModel, base="optional", min_models=1)
def multislerp(base, tensors, per_model, shared: MultiSlerpShared, rng=None) -> torch.Tensor:
    """Weighted spherical mean of the models (or of their deltas from the base), scaled by their mean norm."""
    dtype = compute_dtype(base, tensors)
    if len(tensors) == 1:
        return tensors[0].to(dtype, copy=True)
    weights = [p.weight for p in per_model]
    if shared.normalize_weights:
        total = sum(weights)
        if total == 0:
            raise ValueError("multislerp: the weights sum to 0, so they cannot be normalized "
                             "(set normalize_weights: false)")
        weights = [w / total for w in weights]
    vectors = offsets(base, tensors, dtype)
    if not any(bool(v.any()) for v in vectors):
        # Every input equals the base (a tensor no fine-tune touched, e.g. frozen embeddings): nothing moved, so
        # nothing to interpolate. mergekit raises "antipodal" here with three or more models; the limit is the base.
        return add_base(base, torch.zeros_like(vectors[0]))
    merged = barycentre_on_sphere(vectors, weights, shared.eps)
    if merged is None:
        if len(vectors) != 2:
            raise ValueError("multislerp: the weighted directions cancel out (antipodal inputs with balancing "
                             "weights); change the weights")
        merged = vectors[0] * weights[0] + vectors[1] * weights[1]
    return add_base(base, merged)
