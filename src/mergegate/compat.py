"""Compatibility checks run before any tensor is merged. Each failure names the models and what differs."""

from __future__ import annotations

import hashlib
import json

import torch

from .errors import IncompatibleModels
from .io.read import Checkpoint
from .io.write import natural_key

# Config fields that change tensor shapes or how the weights are wired.
SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
    "num_local_experts", "num_experts_per_tok",
)
DEPTH_KEYS = ("num_hidden_layers", "n_layer")
# A fine-tune of the reference moves a weight by a small fraction of its norm; independent initialisations
# of the same shape sit about sqrt(2) apart. Anything past 1.0 is not a shared lineage.
MAX_RELATIVE_DISTANCE = 1.0
_SHOWN = 5


def check_compatible(checkpoints: dict[str, Checkpoint], reference: str, *, check_lineage: bool = True,
                     same_depth: bool = True, same_vocabulary: bool = True) -> None:
    """Raise IncompatibleModels unless every checkpoint can be merged with `reference` tensor by tensor.

    `same_depth=False` (slices) lets layer counts differ, and `same_vocabulary=False` (vocabulary merging)
    lets vocabularies differ: the planner then checks each tensor it reads, and vocab.py the tokenizers.
    """
    ref = checkpoints[reference]
    others = {name: ck for name, ck in checkpoints.items() if name != reference}
    for name, ck in others.items():
        _check_config(reference, ref, name, ck, same_depth, same_vocabulary)
        if same_depth and same_vocabulary:
            _check_tensors(reference, ref, name, ck)
    if same_vocabulary:
        _check_tokenizers(reference, ref, others)
    if check_lineage:
        for name, ck in others.items():
            _check_lineage(reference, ref, name, ck)


def _check_config(ref_name: str, ref: Checkpoint, name: str, ck: Checkpoint, same_depth: bool = True,
                  same_vocabulary: bool = True) -> None:
    if ref.architecture != ck.architecture:
        raise IncompatibleModels(
            f"architectures differ: '{ref_name}' is {ref.architecture}, '{name}' is {ck.architecture}"
        )
    skip = (() if same_depth else DEPTH_KEYS) + (() if same_vocabulary else ("vocab_size",))
    keys = [k for k in SHAPE_KEYS if k not in skip]
    diffs = [f"{key}: {ref.config.get(key)!r} vs {ck.config.get(key)!r}" for key in keys
             if ref.config.get(key) != ck.config.get(key)]
    if diffs:
        hint = (". If the vocabularies differ by added tokens, set tokenizer_source: union (or base, or a model) "
                "to align embedding rows by token") if any(d.startswith("vocab_size") for d in diffs) else ""
        raise IncompatibleModels(
            f"config of '{name}' differs from '{ref_name}' in shape-defining fields: " + "; ".join(diffs[:_SHOWN]) + hint
        )


def _check_tensors(ref_name: str, ref: Checkpoint, name: str, ck: Checkpoint) -> None:
    missing = sorted(set(ref.tensors) - set(ck.tensors), key=natural_key)
    extra = sorted(set(ck.tensors) - set(ref.tensors), key=natural_key)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from '{name}': {', '.join(missing[:_SHOWN])}" + (" …" if len(missing) > _SHOWN else ""))
        if extra:
            parts.append(f"only in '{name}': {', '.join(extra[:_SHOWN])}" + (" …" if len(extra) > _SHOWN else ""))
        raise IncompatibleModels(f"tensor names differ between '{ref_name}' and '{name}': " + "; ".join(parts))
    shape_diffs = [f"{t}: {list(ref.tensors[t].shape)} vs {list(ck.tensors[t].shape)}"
                   for t in sorted(ref.tensors, key=natural_key) if ref.tensors[t].shape != ck.tensors[t].shape]
    if shape_diffs:
        raise IncompatibleModels(
            f"tensor shapes differ between '{ref_name}' and '{name}' ({len(shape_diffs)} tensors): "
            + "; ".join(shape_diffs[:_SHOWN])
        )


def vocabulary_hash(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def _check_tokenizers(ref_name: str, ref: Checkpoint, others: dict[str, Checkpoint]) -> None:
    ref_vocab = ref.vocabulary()
    for name, ck in others.items():
        vocab = ck.vocabulary()
        if ref_vocab is None and vocab is None:
            continue
        if ref_vocab is None or vocab is None:
            has, lacks = (ref_name, name) if vocab is None else (name, ref_name)
            raise IncompatibleModels(f"'{has}' has a tokenizer.json and '{lacks}' has none: cannot check they match")
        if vocabulary_hash(ref_vocab) == vocabulary_hash(vocab):
            continue
        differing = sorted(set(ref_vocab.items()) ^ set(vocab.items()), key=lambda kv: kv[1])
        examples = ", ".join(f"{tok!r}@{idx}" for tok, idx in differing[:_SHOWN])
        raise IncompatibleModels(
            f"tokenizers differ: '{ref_name}' has {len(ref_vocab)} tokens, '{name}' has {len(vocab)}; "
            f"differing entries include {examples}. If they differ by added tokens, set tokenizer_source: union "
            f"(or base, or a model) to align embedding rows by token"
        )


def _lineage_probes(ck: Checkpoint, count: int = 3) -> list[str]:
    """A few 2-D weights inside the blocks: cheap to read, and far apart for unrelated models."""
    names = sorted(ck.tensors, key=natural_key)
    inner = [n for n in names if len(ck.tensors[n].shape) == 2 and ck.tensors[n].dtype.is_floating_point
             and "embed" not in n and "lm_head" not in n]
    return inner[:count]


def _check_lineage(ref_name: str, ref: Checkpoint, name: str, ck: Checkpoint) -> None:
    for tensor in _lineage_probes(ref):
        a = ref.read(tensor).float()
        b = ck.read(tensor).float()
        scale = torch.linalg.vector_norm(a)
        if scale == 0:
            continue
        distance = float(torch.linalg.vector_norm(b - a) / scale)
        if distance > MAX_RELATIVE_DISTANCE:
            raise IncompatibleModels(
                f"'{name}' does not look derived from '{ref_name}': tensor '{tensor}' differs by {distance:.2f}× "
                f"its norm (fine-tunes differ by a small fraction; unrelated initialisations by about 1.41)"
            )
