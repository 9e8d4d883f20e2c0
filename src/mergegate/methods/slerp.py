"""SLERP: spherical interpolation between the base and one other model, per tensor.

Both tensors are flattened; near-parallel or antiparallel pairs (|cos| > 0.9995) fall back to linear
interpolation, as mergekit does. Computed in float32 (float64 inputs stay float64).
"""

from dataclasses import dataclass

import torch

from ._registry import NoParams, param, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpShared:
    t: float = param()


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interpolate from `a` (t=0) to `b` (t=1) along the great circle between their directions."""
    norm_a = torch.linalg.vector_norm(a).double()
    norm_b = torch.linalg.vector_norm(b).double()
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    dot = (torch.dot(a.reshape(-1), b.reshape(-1)).double() / (norm_a * norm_b)).clamp(-1, 1).item()
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=torch.float64))
        sin_theta = torch.sin(theta)
        coef_a = (torch.sin((1 - t) * theta) / sin_theta).item()
        coef_b = (torch.sin(t * theta) / sin_theta).item()
    return torch.add(a * coef_a, b, alpha=coef_b)


@register("slerp", shared=SlerpShared, per_model=NoParams, min_models=1, max_models=1)
def slerp(base, tensors, per_model, shared: SlerpShared, rng=None) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    return slerp_tensors(shared.t, base, tensors[0].to(base.dtype))
