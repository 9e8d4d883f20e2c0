"""SLERP: spherical interpolation between the base and one other model, per tensor.

Both tensors are flattened; near-parallel or antiparallel pairs (|cos| > 0.9995) fall back to linear
interpolation, as mergekit does. Computed in float32 (float64 inputs stay float64). A large tensor (an
embedding) is done in two passes — norms and the dot product accumulated over row chunks in float64, then
the interpolation chunk by chunk — so the other model is never copied whole to float32.
"""

from dataclasses import dataclass

import torch

from ._registry import CHUNK_ELEMENTS, NoParams, param, register, row_spans

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


def slerp_coefficients(t: float, norm_a: float, norm_b: float, dot: float) -> tuple[float, float]:
    """The weights of `a` and `b` for interpolating at `t`, from their norms and dot product."""
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    cosine = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cosine) > DOT_THRESHOLD:
        return 1 - t, t
    theta = torch.acos(torch.tensor(cosine, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta).item(), (torch.sin(t * theta) / sin_theta).item()


def chunked_slerp(t: float, a: torch.Tensor, b: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """`slerp_tensors` over row chunks: `b` stays in its stored dtype, each chunk is raised to `a`'s."""
    spans = row_spans(a.shape, chunk_elements)
    squares_a = squares_b = dot = 0.0
    for lo, hi in spans:  # pass 1: norms and dot product, accumulated in float64
        chunk_a, chunk_b = a[lo:hi].reshape(-1).double(), b[lo:hi].reshape(-1).double()
        squares_a += float(chunk_a @ chunk_a)
        squares_b += float(chunk_b @ chunk_b)
        dot += float(chunk_a @ chunk_b)
    coef_a, coef_b = slerp_coefficients(t, squares_a ** 0.5, squares_b ** 0.5, dot)
    out = torch.empty_like(a)
    for lo, hi in spans:  # pass 2: the interpolation, elementwise
        out[lo:hi] = torch.add(a[lo:hi] * coef_a, b[lo:hi].to(a.dtype), alpha=coef_b)
    return out


@register("slerp", shared=SlerpShared, per_model=NoParams, min_models=1, max_models=1)
def slerp(base, tensors, per_model, shared: SlerpShared, rng=None) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    if len(row_spans(base.shape, CHUNK_ELEMENTS)) > 1:  # large: the two-pass form
        return chunked_slerp(shared.t, base, tensors[0], CHUNK_ELEMENTS)
    return slerp_tensors(shared.t, base, tensors[0].to(base.dtype))
