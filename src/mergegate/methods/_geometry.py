"""Helpers shared by the geometric methods (model_stock, nuslerp, multislerp, karcher, ram): the dtype they
compute in, and inputs taken relative to an optional base."""

from __future__ import annotations

from typing import Sequence

import torch

from ._registry import work_dtype


def compute_dtype(base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float32 (float64 when any input is float64): the dtype these methods compute in."""
    dtype = work_dtype(base if base is not None else tensors[0])
    for tensor in tensors:
        dtype = torch.promote_types(dtype, work_dtype(tensor))
    return dtype


def offsets(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each tensor minus the base in `dtype`; without a base, the tensors themselves in `dtype`.

    The results may share storage with the inputs (no base, same dtype): callers must not modify them in place.
    """
    if base is None:
        return [tensor.to(dtype) for tensor in tensors]
    base = base.to(dtype)
    return [torch.sub(tensor.to(dtype), base) for tensor in tensors]


def add_base(base: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """`result` moved back from offsets to weights (unchanged without a base)."""
    return result if base is None else result + base.to(result.dtype)
