"""Float dtypes by name, as recipes, MoE configs and config.json's `torch_dtype` spell them: the one table that
merging, the mixture of experts and adapter folding read. torch is imported only when a name becomes a dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

ModelDTypeName = Literal["float32", "float16", "bfloat16"]  # what models are written in
DTypeName = Literal[ModelDTypeName, "float64"]  # float64: a recipe may also compute and write in it
MODEL_DTYPE_NAMES: tuple[str, ...] = get_args(ModelDTypeName)
DTYPE_NAMES: tuple[str, ...] = get_args(DTypeName)
# other spellings of the names that recipes may use (mergekit accepts them)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def canonical_name(value: Any) -> Any:
    """The dtype name an alias stands for; any other value as it is (for a validator to name it)."""
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of DTYPE_NAMES (KeyError for another name)."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def declared_dtype(config: dict, names: tuple[str, ...] = DTYPE_NAMES) -> torch.dtype | None:
    """The dtype a model's config.json declares (`torch_dtype`, or transformers 5's `dtype`) when it is one of
    `names`; None when it declares none or another."""
    declared = config.get("torch_dtype") or config.get("dtype")
    return torch_dtype(declared) if isinstance(declared, str) and declared in names else None
