"""NuSLERP: spherical interpolation between exactly two models, with weights instead of `t`, optionally of
their task vectors, and optionally per row or column instead of over the whole tensor.

t = weight_2 / (weight_1 + weight_2) (0.5 when the weights sum to about 0). With a base, the two deltas
from it are interpolated and the base is added back; without one, the weights themselves. By default
(`nuslerp_flatten`) each tensor is one vector. With `nuslerp_flatten: false` every vector along the last
dimension (each row of a matrix) is interpolated on its own, or with `nuslerp_row_wise: true` every vector
along the first dimension (each column of a matrix; the option's name is mergekit's). Vectors that are
(anti)parallel to float precision are interpolated linearly. As mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._geometry import add_base, compute_dtype, offsets
from ._registry import param, register

WEIGHT_SUM_EPS = 1e-6
NORM_FLOOR = 1e-7  # norms below this do not scale a vector up to unit length
COLINEAR_EPS = 1e-8  # 1 - cos² at or below COLINEAR_EPS² counts as parallel


@dataclass(frozen=True)
class NuSlerpShared:
    nuslerp_row_wise: bool = param(False)
    nuslerp_flatten: bool = param(True)


@dataclass(frozen=True)
class NuSlerpModel:
    weight: float = param()


def slerp_along_last(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1) of each vector along the last dimension.

    The coefficients come from the angle between the directions; the vectors keep their own lengths,
    so the result's length varies smoothly between theirs.
    """
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))  # any finite angle where colinear
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def interpolation_t(weights: list[float]) -> float:
    """The share of the second model: w2 / (w1 + w2), or 0.5 when the weights cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else weights[1] / total


@register("nuslerp", shared=NuSlerpShared, per_model=NuSlerpModel, base="optional", min_models=2, max_models=2)
def nuslerp(base, tensors, per_model, shared: NuSlerpShared, rng=None) -> torch.Tensor:
    """Spherical interpolation of two models (or their deltas from the base), weighted, per tensor/row/column."""
    t = interpolation_t([p.weight for p in per_model])
    v0, v1 = offsets(base, tensors, compute_dtype(base, tensors))
    shape = v0.shape
    if shared.nuslerp_flatten:
        merged = slerp_along_last(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif shared.nuslerp_row_wise and v0.dim() > 1:
        # vectors along the first dimension: swap it with the last, interpolate, swap back
        merged = slerp_along_last(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = slerp_along_last(t, v0.reshape(1, -1) if v0.dim() == 0 else v0,
                                  v1.reshape(1, -1) if v1.dim() == 0 else v1).reshape(shape)
    return add_base(base, merged)
