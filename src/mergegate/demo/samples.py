"""Generated sample checkpoints: a tiny Llama base with its own tokenizer, and fine-tunes as base + small deltas.

Used by the tests and the gateway benchmark. Real `transformers` models written with
`save_pretrained`, deterministic for a given seed, so anyone can rebuild them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CHARSET = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}<>=+-*/_@#$%&\n"


@dataclass(frozen=True)
class SampleShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    vocab: int | None = None  # None: the character tokenizer's size
    tie_embeddings: bool = False


def write_tokenizer(folder: Path, extra_tokens: tuple[str, ...] = ()) -> int:
    """A character-level tokenizer (plus specials), saved in Hugging Face format. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(CHARSET)) + list(extra_tokens))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return len(vocab)


def write_base(folder: Path, shape: SampleShape = SampleShape(), seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """A randomly initialised LlamaForCausalLM and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=shape.vocab or vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=256, tie_word_embeddings=shape.tie_embeddings, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)  # transformers types `.to` as taking a model, not a dtype
    model.to(dtype).save_pretrained(folder)
    return folder


def write_finetune(base: Path, folder: Path, seed: int, scale: float = 0.02, dtype: torch.dtype | None = None,
                   poison: str | None = None) -> Path:
    """A copy of `base` whose float tensors moved by `scale` × their RMS in a seeded random direction.

    `poison` names a tensor that gets a NaN, for refusal tests.
    """
    from safetensors import safe_open

    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            (folder / item.name).write_bytes(item.read_bytes())
    generator = torch.Generator().manual_seed(seed)
    for file in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                work = tensor.float()
                rms = work.pow(2).mean().sqrt().clamp_min(1e-3)
                noise = torch.randn(work.shape, generator=generator)
                out = work + scale * rms * noise
                if name == poison:
                    out.view(-1)[0] = float("nan")
                tensors[name] = out.to(dtype or tensor.dtype).contiguous()
        save_file(tensors, folder / file.name, metadata={"format": "pt"})
    return folder


def write_family(root: Path, finetunes: int = 3, shape: SampleShape = SampleShape(), seed: int = 0,
                 dtype: torch.dtype = torch.float32, scale: float = 0.02) -> dict[str, Path]:
    """`base` plus `ft1..ftN` under `root`; returns name → folder."""
    root = Path(root)
    family = {"base": write_base(root / "base", shape, seed, dtype)}
    for i in range(1, finetunes + 1):
        family[f"ft{i}"] = write_finetune(family["base"], root / f"ft{i}", seed=seed * 1000 + i, scale=scale)
    return family


def describe(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def add_vocabulary(folder: Path, tokens: list[str], seed: int = 0) -> Path:
    """Give a sample model extra tokens (as a fine-tune that learned new special tokens would have):
    the tokenizer gains them, and the embedding and lm_head gain one seeded row each."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    new_rows = len(tokenizer) - config["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        for name in fh.keys():
            tensor = fh.get_tensor(name)
            if tensor.dim() == 2 and tensor.shape[0] == config["vocab_size"] and new_rows > 0:
                extra = torch.randn(new_rows, tensor.shape[1], generator=generator) * tensor.float().std()
                tensor = torch.cat([tensor, extra.to(tensor.dtype)])
            tensors[name] = tensor.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config["vocab_size"] = len(tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
