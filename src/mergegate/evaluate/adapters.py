"""Adapters kept apart on one shared base: the base loaded once and every adapter loaded on it by name with PEFT
(`PeftModel.from_pretrained(base, first, adapter_name=...)`, then `load_adapter`), one adapter active at a time
(`set_adapter`), or none (`disable_adapter()`: the base alone). No adapter copies the base: each adds only its
LoRA matrices. `held_parameter_bytes` says what loaded modules hold, counted once per storage."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import EvaluationError
from ..model_ref import ModelRef


def load_shared(base: Path, adapters: Mapping[str, Path], device: str | None = None) -> tuple[Any, Any]:
    """The base at `base` with every adapter of `adapters` (name → folder) loaded on it under its name, and the
    base's tokenizer; the model is a PeftModel when there is an adapter (none active until `use_adapter`)."""
    from .local import load_model

    model, tokenizer = load_model(ModelRef("base", Path(base)), device)
    if not adapters:
        return model, tokenizer
    from peft import PeftModel

    names = list(adapters)
    try:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise EvaluationError(f"adapters on {base} cannot be loaded: {exc}") from None
    model.eval()
    return model, tokenizer


@contextmanager
def use_adapter(model: Any, adapter: str | None) -> Iterator[None]:
    """`adapter` active on a shared model for the block; None: the base alone (every adapter disabled)."""
    if adapter is None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
        return
    if adapter not in getattr(model, "peft_config", {}):
        raise EvaluationError(f"adapter '{adapter}' is not loaded on this base "
                              f"(loaded: {', '.join(getattr(model, 'peft_config', {})) or 'none'})")
    model.set_adapter(adapter)
    yield


def held_parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of parameters and buffers the modules hold, each storage counted once (tied weights, and a base
    shared by several models, count one time)."""
    seen: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
