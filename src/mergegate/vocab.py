"""Vocabulary merging: checkpoints whose tokenizers differ by added tokens, aligned row by row by token string.

mergekit's semantics (`tokenizer_source: base | union | <model>` and the `tokenizer:` section):
- the output vocabulary is the base's, the union (the base's, then every other model's new tokens in recipe
  order, then added tokens), or one model's; `tokenizer.tokens` may add tokens;
- every vocabulary-indexed tensor (embeddings, lm_head) of every input is permuted to the output vocabulary
  before the merge method runs; a row a model lacks is filled by a default: the only model that has the token,
  else the base's row, else the mean over the models that have it, else zero — or as `tokens` says
  (`source: model`, `{kind: model_token, model, token | token_id}`, `{kind: zero}`; `force` uses the source
  even for models that have the token);
- padding rows (`pad_to_multiple_of`) take each model's mean embedding.
Unrelated vocabularies (too few tokens in common) are refused: aligning them by string would be meaningless.
"""

from __future__ import annotations

import importlib.resources
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleModels, RecipeError
from .io.read import Checkpoint

MIN_SHARED_FRACTION = 0.9  # of the smaller vocabulary's tokens, by string; fine-tunes that add tokens share ~all


@dataclass(frozen=True)
class TokenDefault:
    """Where a token's row comes from when a model lacks it (or always, with `force`)."""

    kind: str  # "model" | "model_token" | "zero" | "average"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class VocabularyPlan:
    vocab: dict[str, int]  # output token → id
    rows: int  # output rows (len(vocab), padded)
    permutations: dict[str, torch.Tensor]  # model ref → for each output id, the model's row or -1
    original: dict[str, dict[str, int]]  # model ref → its own vocabulary
    defaults: dict[str, TokenDefault]  # explicit `tokens` entries
    base: str | None
    tokenizer: Any = field(repr=False, default=None)  # the output tokenizer (transformers), saved with the model
    identity: bool = False  # every input already has the output vocabulary: no row moves (chat template only)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)


def tensor_has_vocabulary(checkpoint: Checkpoint, name: str) -> bool:
    """Embeddings and output heads: 2-D tensors outside the blocks with one row per token of the model."""
    shape = checkpoint.tensors[name].shape
    rows = checkpoint.config.get("vocab_size")
    return len(shape) == 2 and rows is not None and shape[0] == rows and ".layers." not in name


def plan_vocabulary(recipe, checkpoints: dict[str, Checkpoint], base: str | None, reference: str
                    ) -> VocabularyPlan | None:
    """The output vocabulary and each model's permutation; None when the recipe asks for no vocabulary merge."""
    section = recipe.tokenizer
    source = section.source if section else recipe.tokenizer_source
    if source is None and not recipe.chat_template:
        return None
    source = source or "base"
    anchor = base or reference
    vocabs = {ref: _vocabulary(ck, ref) for ref, ck in checkpoints.items()}
    for ref, vocab in vocabs.items():
        _check_related(anchor, vocabs[anchor], ref, vocab)
    tokenizers = {ref: _load_tokenizer(ck, ref) for ref, ck in checkpoints.items()}
    sizes = {ck.config.get("vocab_size") for ck in checkpoints.values()}
    simple = not (section and (section.tokens or section.pad_to_multiple_of))
    if simple and len(sizes) == 1 and all(vocab == vocabs[anchor] for vocab in vocabs.values()):
        if not recipe.chat_template:
            return None  # nothing to align: the tokenizer files are copied as they are
        owner = source if source not in ("base", "union") else anchor
        tokenizer = tokenizers[owner]
        tokenizer.chat_template = select_chat_template(recipe.chat_template, tokenizers)
        return VocabularyPlan(vocabs[owner], len(vocabs[owner]), {}, vocabs, {}, base, tokenizer, identity=True)
    if source == "union":
        tokenizer = _union(anchor, tokenizers, checkpoints)
    else:
        owner = anchor if source == "base" else source
        tokenizer = _load_tokenizer(checkpoints[owner], owner)
    defaults = {}
    for token, cfg in ((section.tokens or {}) if section else {}).items():
        defaults[token] = _token_default(token, cfg, checkpoints)
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token])
    if recipe.chat_template:
        tokenizer.chat_template = select_chat_template(recipe.chat_template, tokenizers)
    vocab = tokenizer.get_vocab()
    rows = len(vocab)
    pad = section.pad_to_multiple_of if section else None
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    permutations = {}
    for ref, ck in checkpoints.items():
        own, limit = vocabs[ref], int(ck.config.get("vocab_size") or len(vocabs[ref]))
        perm = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old_id = own.get(token)
            if old_id is not None and old_id < limit:  # ids past the embedding (padding) have no row
                perm[new_id] = old_id
        permutations[ref] = perm
    return VocabularyPlan(vocab, rows, permutations, vocabs, defaults, base, tokenizer)


def align(plan: VocabularyPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each model's vocabulary-indexed tensor, permuted to the output vocabulary (rows × the rest)."""
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for tensor in tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    width = tensors[models[0]].shape[1:]
    ids = torch.tensor(sorted(plan.vocab.values()), dtype=torch.long)
    defaults: dict[int, torch.Tensor] = {}
    forced: set[int] = set()
    present = {ref: plan.permutations[ref] >= 0 for ref in models}
    for token, token_id in plan.vocab.items():
        cfg = plan.defaults.get(token)
        if cfg is not None and cfg.force:
            forced.add(token_id)
        elif all(bool(present[ref][token_id]) for ref in models):
            continue
        cfg = cfg or _implicit_default(plan, models, token_id)
        defaults[token_id] = _default_row(plan, cfg, tensors, models, token, token_id, width, dtype)
    aligned = {}
    for ref in models:
        perm = plan.permutations[ref]
        out = torch.zeros((plan.rows, *width), dtype=dtype)
        keep = perm[ids] >= 0
        if forced:
            keep &= ~torch.isin(ids, torch.tensor(sorted(forced)))
        out[ids[keep]] = tensors[ref][perm[ids[keep]]].to(dtype)
        for token_id, row in defaults.items():
            if token_id in forced or perm[token_id] < 0:
                out[token_id] = row
        if plan.rows > len(plan.vocab):  # padding rows: the model's mean embedding (Hewitt's vocab expansion)
            out[len(plan.vocab):] = out[:len(plan.vocab)].mean(dim=0)
        aligned[ref] = out
    return aligned


def _implicit_default(plan: VocabularyPlan, models: list[str], token_id: int) -> TokenDefault:
    having = [ref for ref in models if plan.permutations[ref][token_id] >= 0]
    if len(having) == 1:
        return TokenDefault("model", having[0])
    if not having:
        return TokenDefault("zero")
    if plan.base in having:
        return TokenDefault("model", plan.base)
    return TokenDefault("average")


def _default_row(plan, cfg: TokenDefault, tensors, models, token, token_id, width, dtype) -> torch.Tensor:
    if cfg.kind == "zero":
        return torch.zeros(width, dtype=dtype)
    if cfg.kind == "average":
        rows = [tensors[ref][plan.permutations[ref][token_id]].to(dtype) for ref in models
                if plan.permutations[ref][token_id] >= 0]
        return torch.stack(rows).mean(dim=0)
    if cfg.model not in tensors:
        raise IncompatibleModels(f"tokenizer.tokens[{token!r}]: its source model '{cfg.model}' is not an input "
                                 f"of this tensor")
    if cfg.kind == "model_token":
        source_id = cfg.token_id if cfg.token_id is not None else plan.original[cfg.model].get(cfg.token)
        if source_id is None or not 0 <= source_id < tensors[cfg.model].shape[0]:
            raise IncompatibleModels(f"tokenizer.tokens[{token!r}]: model '{cfg.model}' has no token "
                                     f"{cfg.token if cfg.token is not None else cfg.token_id!r}")
        return tensors[cfg.model][source_id].to(dtype)
    row = plan.permutations[cfg.model][token_id]
    if row < 0:
        raise IncompatibleModels(f"tokenizer.tokens[{token!r}]: model '{cfg.model}' does not have this token")
    return tensors[cfg.model][row].to(dtype)


def _token_default(token: str, cfg, checkpoints) -> TokenDefault:
    source = cfg.source
    if source is None:
        return TokenDefault("average", force=cfg.force)
    if isinstance(source, str):
        _known(source, checkpoints, token)
        return TokenDefault("model", source, force=cfg.force)
    if source.kind == "zero":
        return TokenDefault("zero", force=cfg.force)
    _known(source.model, checkpoints, token)
    return TokenDefault("model_token", source.model, source.token, source.token_id, force=cfg.force)


def _known(model: str, checkpoints, token: str) -> None:
    if model not in checkpoints:
        raise RecipeError(f"tokenizer.tokens[{token!r}].source: '{model}' is not one of the recipe's models")


def _vocabulary(checkpoint: Checkpoint, ref: str) -> dict[str, int]:
    vocab = checkpoint.vocabulary()
    if vocab is None:
        raise IncompatibleModels(f"model '{ref}' has no tokenizer.json, so its vocabulary cannot be aligned")
    return vocab


def _check_related(anchor: str, anchor_vocab: dict[str, int], ref: str, vocab: dict[str, int]) -> None:
    shared = len(anchor_vocab.keys() & vocab.keys())
    fraction = shared / max(1, min(len(anchor_vocab), len(vocab)))
    if fraction < MIN_SHARED_FRACTION:
        raise IncompatibleModels(
            f"tokenizers of '{anchor}' and '{ref}' share only {fraction:.0%} of their tokens ({shared} of "
            f"{min(len(anchor_vocab), len(vocab))}): unrelated vocabularies cannot be merged row by row; "
            f"vocabulary merging needs tokenizers that differ by added tokens"
        )


def _load_tokenizer(checkpoint: Checkpoint, ref: str):
    from transformers import AutoTokenizer

    # the tokenizer may read any file of the folder, and what it read is saved with the merged model: refuse
    # links that leave the folder (a chat_template.jinja pointing at /etc/passwd) before loading it
    checkpoint.check_side_files()
    try:
        return AutoTokenizer.from_pretrained(checkpoint.path, use_fast=True)
    except Exception as exc:  # transformers raises many kinds for unreadable tokenizer folders
        raise IncompatibleModels(f"model '{ref}': its tokenizer cannot be loaded ({exc})") from None


def _union(anchor: str, tokenizers: dict, checkpoints: dict[str, Checkpoint]):
    """The anchor's tokenizer plus every other model's new tokens (plain ones first, then added ones)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:  # a private copy, so the anchor's tokenizer stays untouched
        tokenizers[anchor].save_pretrained(scratch)
        union = AutoTokenizer.from_pretrained(scratch, use_fast=True)
    known = set(union.get_vocab())
    plain: list[str] = []
    added: dict[str, Any] = {}
    for ref in [anchor] + [r for r in tokenizers if r != anchor]:
        tokenizer = tokenizers[ref]
        limit = int(checkpoints[ref].config.get("vocab_size") or len(tokenizer))
        specials = {info.content: info for idx, info in tokenizer.added_tokens_decoder.items() if idx < limit}
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < limit and token not in specials and token not in known and token not in plain:
                plain.append(token)
        for token, info in specials.items():
            added.setdefault(token, info)
    union.add_tokens(plain)
    union.add_tokens([info for token, info in added.items() if token not in known])
    return union


def select_chat_template(choice: str, tokenizers: dict) -> str:
    """mergekit's `chat_template`: "auto" (the most common among the inputs), a bundled name, or a Jinja string."""
    if choice == "auto":
        templates = []
        for tokenizer in tokenizers.values():
            template = tokenizer.chat_template
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                templates.append(template.strip())
        if not templates:
            raise RecipeError("chat_template: 'auto' found no chat template in any input model's tokenizer")
        return Counter(templates).most_common(1)[0][0]
    bundled = importlib.resources.files("mergegate") / "chat_templates" / f"{choice}.jinja"
    if "{" not in choice and "\n" not in choice and len(choice) < 256:
        if bundled.is_file():
            return bundled.read_text()
        folder = importlib.resources.files("mergegate") / "chat_templates"
        names = sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))
        raise RecipeError(f"chat_template: unknown template {choice!r}; bundled: {', '.join(names)}, or 'auto', "
                          f"or a Jinja template string")
    return choice

