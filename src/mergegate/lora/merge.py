"""Fold a LoRA adapter into its base model: W' = W + weight · scaling · B@A on every targeted weight.

The base is streamed tensor by tensor (one tensor in memory at a time) into shards laid out up front, in a
staging folder renamed into place at the end, so `out_dir` never holds a half-written model.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import torch

from .._staging import check_output, staged
from ..errors import IncompatibleModels
from ..io.dtypes import declared_dtype
from ..io.read import Checkpoint
from ..io.write import OutputTensor, ShardedWriter, copy_model_files, parse_size
from .adapter import Adapter, read_adapter

# Config fields that fix the shapes and wiring of a model: two folders that differ in any are different models.
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim", "n_embd", "n_layer")


def _named_base_folder(adapter: Adapter) -> Path | None:
    """The local folder the adapter's `base_model_name_or_path` names (absolute, or relative to the adapter
    folder or the working directory), when one exists."""
    named = adapter.config.base_model_name_or_path
    if not named:
        return None
    candidates = [Path(named)] if Path(named).is_absolute() else [adapter.path / named, Path(named)]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def check_base_name(adapter: Adapter, base: Checkpoint) -> None:
    """Refuse when the adapter names a local base folder whose architecture differs from `base`; warn when it
    names a model that cannot be checked (a hub id) and does not look like `base`. Shapes are checked apart."""
    named = adapter.config.base_model_name_or_path
    folder = _named_base_folder(adapter)
    if folder is None:
        if named and Path(named).name != base.path.absolute().name:
            warnings.warn(f"adapter '{adapter.path}' was trained on '{named}'; applying it to '{base.path}' "
                          "(only tensor shapes can be checked)", stacklevel=3)
        return
    if folder.resolve() == base.path.resolve():
        return
    try:
        trained_on = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    differ = [key for key in ARCHITECTURE_FIELDS if trained_on.get(key) != base.config.get(key)]
    if differ:
        details = ", ".join(f"{key}: {trained_on.get(key)!r} vs {base.config.get(key)!r}" for key in differ)
        raise IncompatibleModels(
            f"adapter '{adapter.path}' was trained on '{named}' ({folder}), whose config.json differs from base "
            f"'{base.path}' in {details}")


def check_adapter_fits(adapter: Adapter, base: Checkpoint) -> None:
    """Every targeted weight must exist in the base with the shape of the adapter's delta."""
    tied = bool(base.config.get("tie_word_embeddings"))
    for name, lora in adapter.modules.items():
        ref = base.tensors.get(name)
        if ref is None:
            hint = (" (the base ties lm_head to the input embeddings, so it stores no lm_head weight)"
                    if tied and lora.module.endswith("lm_head") else "")
            raise IncompatibleModels(f"adapter '{adapter.path}' targets tensor '{name}', which base model "
                                     f"'{base.path}' does not have{hint}")
        if tuple(ref.shape) != lora.weight_shape:
            raise IncompatibleModels(
                f"adapter '{adapter.path}': tensor '{name}' is {list(ref.shape)} in base '{base.path}' but the "
                f"adapter's delta is {list(lora.weight_shape)} (lora_A {list(lora.A.shape)}, lora_B "
                f"{list(lora.B.shape)}): the adapter was trained on a different model")
        if not ref.dtype.is_floating_point:
            raise IncompatibleModels(f"base '{base.path}': tensor '{name}' has dtype {ref.dtype}, not a float")
    for name, tensor in adapter.full_weights.items():
        ref = base.tensors.get(name)
        if ref is None or tuple(ref.shape) != tuple(tensor.shape):
            found = "absent" if ref is None else f"{list(ref.shape)}"
            raise IncompatibleModels(
                f"adapter '{adapter.path}' carries a full copy of tensor '{name}' {list(tensor.shape)}, which is "
                f"{found} in base '{base.path}' (a resized vocabulary?): mergegate does not resize models")


def _full_weight(adapter: Adapter, name: str, stored: torch.Tensor) -> torch.Tensor:
    """The adapter's own copy of a tensor, which PEFT loads over the base's; warn when the two differ."""
    carried = adapter.full_weights[name]
    if not torch.equal(carried.to(stored.dtype), stored):
        warnings.warn(f"adapter '{adapter.path}' carries its own '{name}', which differs from the base's; using "
                      "the adapter's copy, as PEFT does", stacklevel=3)
    return carried.to(stored.dtype)


def model_dtype(base: Checkpoint) -> torch.dtype:
    """The dtype the base's config declares, else the most common float dtype among its tensors."""
    declared = declared_dtype(base.config)
    if declared is not None:
        return declared
    floats = Counter(ref.dtype for ref in base.tensors.values() if ref.dtype.is_floating_point)
    return floats.most_common(1)[0][0] if floats else torch.float32


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, allow_pickle: bool = False,
                  weight: float = 1.0, shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Write base + weight·scaling·B@A as a full Hugging Face model folder (safetensors, config, tokenizer).

    Targeted weights are added in float32 and stored in their own dtype; every other tensor is copied as is,
    except those the adapter carries whole (embeddings PEFT saved with it), which replace the base's.
    Raises IncompatibleModels when the adapter does not fit the base (naming the tensor), CheckpointError
    when a folder cannot be read. Returns the output folder.
    """
    check_output(Path(out_dir), overwrite)
    adapter = read_adapter(adapter_dir, allow_pickle=allow_pickle)
    base = Checkpoint(base_dir, allow_pickle=allow_pickle)
    check_adapter_fits(adapter, base)
    check_base_name(adapter, base)
    outputs = [OutputTensor(ref.name, ref.dtype, ref.shape) for ref in base.tensors.values()]
    with staged(Path(out_dir), overwrite) as staging:
        writer = ShardedWriter(staging, outputs, parse_size(shard_size))
        try:
            for name in base.tensors:
                tensor = base.read(name)
                if name in adapter.full_weights:
                    tensor = _full_weight(adapter, name, tensor)
                if name in adapter.modules:
                    tensor = (tensor.float() + adapter.delta(name, weight)).to(tensor.dtype)
                writer.write(name, tensor)
                base.release(name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_model_files(base, base, staging, model_dtype(base))
    return Path(out_dir).absolute()
