"""Turn a GGUF file (llama.cpp's format) into a Hugging Face model folder: safetensors weights, config, tokenizer
and chat template, so a model published only as GGUF can be a merge's base or source.

transformers reads the file (`from_pretrained(..., gguf_file=)`: the architectures it knows, Llama among them)
and dequantizes every quantized tensor to float32: a Q4_1 or Q8_0 source becomes the float32 values its blocks
decode to, exactly, not the weights it was quantized from. The folder is saved from a plain model of the same
class (transformers will not save a model loaded from GGUF), in float32 (the decoded values are exact there;
float16 or bfloat16 would round them again). `gguf_source.json` in the folder records the file's name, size,
SHA-256 and tensor types, so the base of a release says where it came from.

The output appears whole or not at all (`_staging.staged`). Nothing here unpickles: GGUF is read as a
memory-mapped binary.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GGUFImportError

SOURCE_RECORD = "gguf_source.json"


@dataclass(frozen=True)
class ImportedGGUF:
    """What `import_gguf` wrote: the folder, the architecture, and the source's tensor types (name → count)."""

    folder: Path
    architecture: str
    tensor_types: dict[str, int]
    parameters: int

    @property
    def dequantized(self) -> bool:
        return _quantized(self.tensor_types)


def _quantized(tensor_types: dict[str, int]) -> bool:
    return any(name not in ("F32", "F16", "BF16") for name in tensor_types)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_types(path: Path) -> dict[str, int]:
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        from .._extras import install_hint

        raise GGUFImportError(f"reading GGUF needs the `gguf` package: {install_hint('gguf')}") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise GGUFImportError(f"{path}: not a readable GGUF file ({exc})") from None
    return dict(sorted(Counter(tensor.tensor_type.name for tensor in reader.tensors).items()))


def import_gguf(gguf_file: str | Path, out: str | Path, *, overwrite: bool = False) -> ImportedGGUF:
    """Write the model in `gguf_file` as a Hugging Face folder at `out` (float32 safetensors, config, tokenizer,
    chat template, `gguf_source.json`). A quantized file is dequantized. GGUFImportError names what is wrong with
    the file; MergegateError an unusable `out` (an existing non-empty folder is replaced only with `overwrite`)."""
    from .._staging import check_output, staged

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise GGUFImportError(f"{gguf_file}: no such file")
    check_output(out, overwrite)
    tensor_types = _tensor_types(gguf_file)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = gguf_file.resolve().parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFImportError(f"{gguf_file}: transformers cannot load it ({first_line})") from None
    # A model loaded from GGUF refuses save_pretrained: copy its state into a plain model of the same class.
    config = copy.deepcopy(loaded.config)
    # The weights written are plain float32: a config still naming GGUF as their quantization makes vLLM refuse
    # the folder ("Unknown quantization method: gguf").
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain: Any = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    architecture = type(loaded).__name__
    parameters = sum(p.numel() for p in plain.parameters())
    with staged(out, overwrite) as partial:
        plain.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        record = {"file": name, "bytes": gguf_file.stat().st_size, "sha256": _sha256(gguf_file),
                  "tensor_types": tensor_types, "architecture": architecture, "dtype": "float32",
                  "dequantized": _quantized(tensor_types)}
        (partial / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return ImportedGGUF(out, architecture, tensor_types, parameters)
