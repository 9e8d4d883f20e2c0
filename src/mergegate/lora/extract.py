"""Extract a LoRA adapter from a fine-tune: a truncated SVD of each linear weight's delta (fine-tune − base).

Rank per module is either fixed, or the smallest that keeps an `energy` fraction of the delta's squared
singular values (capped by `rank` when both are given). Only 2-D linear weights become LoRA modules:
embeddings, the output head, norms and biases are left out, and the largest delta left out is reported, so
nobody mistakes the adapter for the whole fine-tune.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .._staging import check_output, staged
from ..errors import IncompatibleModels, RecipeError
from ..io.read import Checkpoint
from ..io.write import natural_key
from .adapter import LoraWeights, rank_layout, write_adapter_files

REPORT_FILE = "mergegate_extraction.json"
# Leaf module names of token/position embeddings and output heads: not LoRA targets by default.
_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                     "token_type_embeddings", "embed_positions", "shared", "embed_in")
_HEAD_LEAVES = ("lm_head", "embed_out", "output")


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = None
    energy: float | None = None
    target_modules: tuple[str, ...] | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class ModuleReport:
    module: str
    rank: int
    energy_kept: float  # fraction of the delta's squared singular values kept
    relative_error: float  # ||delta - B@A|| / ||delta|| (Frobenius)


@dataclass(frozen=True)
class SkippedDelta:
    tensor: str
    norm: float  # Frobenius norm of fine-tune − base
    relative: float  # ... over the base tensor's norm


def validate(options: ExtractOptions) -> None:
    if options.rank is None and options.energy is None:
        raise RecipeError("extract: give rank (fixed rank) or energy (fraction of squared singular values kept)")
    if options.rank is not None and (isinstance(options.rank, bool) or not isinstance(options.rank, int)
                                     or options.rank < 1):
        raise RecipeError(f"rank={options.rank!r}: expected a positive integer")
    if options.energy is not None and not 0 < options.energy <= 1:
        raise RecipeError(f"energy={options.energy}: expected a fraction in (0, 1]")
    if options.alpha is not None and options.alpha <= 0:
        raise RecipeError(f"alpha={options.alpha}: expected a positive number")


def rank_for_energy(singular_values: torch.Tensor, energy: float, cap: int) -> int:
    """The smallest k whose top-k squared singular values hold at least `energy` of the total, at most `cap`."""
    squares = singular_values.double().pow(2)
    total = squares.sum().item()
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    k = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1
    return max(1, min(k, cap, singular_values.numel()))


def is_linear_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, *, heads: bool = True) -> bool:
    """A 2-D float `.weight` that is not an embedding (nor, unless `heads`, an output head)."""
    if not name.endswith(".weight") or len(shape) != 2 or not dtype.is_floating_point:
        return False
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return leaf not in _EMBEDDING_LEAVES and (heads or leaf not in _HEAD_LEAVES)


def _matches(module: str, target: str) -> bool:
    # PEFT's rule for a list of target names: the whole path, or its tail after a dot
    return module == target or module.endswith(f".{target}")


def select_targets(checkpoint: Checkpoint, targets: Sequence[str] | None) -> list[str]:
    """Weight names to extract: every linear weight but the output head, or those whose module matches
    `targets` (which may name the head: it is a linear layer, only left out by default)."""
    refs = checkpoint.tensors
    linear = [n for n, ref in refs.items() if is_linear_weight(n, ref.shape, ref.dtype, heads=False)]
    if targets is None:
        return sorted(linear, key=natural_key)
    chosen = []
    for target in targets:
        hits = [n for n in refs if n.endswith(".weight") and _matches(n.removesuffix(".weight"), target)]
        if not hits:
            raise RecipeError(f"target_modules: '{target}' matches no weight of '{checkpoint.path}'")
        for name in hits:
            ref = refs[name]
            if not is_linear_weight(name, ref.shape, ref.dtype):
                raise RecipeError(f"target_modules: '{target}' matches '{name}' of shape {list(ref.shape)}; only "
                                  "2-D float weights of linear layers are extracted (not embeddings or norms)")
            chosen.append(name)
    return sorted(set(chosen), key=natural_key)


def config_targets(chosen: Sequence[str], checkpoint: Checkpoint) -> list[str]:
    """Leaf names when they target exactly the chosen weights (the usual ['q_proj', ...]), else full paths."""
    modules = [n.removesuffix(".weight") for n in chosen]
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    reached = {n.removesuffix(".weight") for n in checkpoint.tensors if n.endswith(".weight")
               and any(_matches(n.removesuffix(".weight"), leaf) for leaf in leaves)}
    return leaves if reached == set(modules) else sorted(modules, key=natural_key)


def factorize(delta: torch.Tensor, options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """Truncated SVD of a float32 delta (out, in): A = sqrt(S)·Vh, B = U·sqrt(S), so B@A ≈ delta."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    cap = options.rank or s.numel()
    k = rank_for_energy(s, options.energy, cap) if options.energy is not None else min(cap, s.numel())
    root = s[:k].sqrt()
    a, b = root[:, None] * vh[:k], u[:, :k] * root
    total = s.double().pow(2).sum().item()
    kept = s[:k].double().pow(2).sum().item()
    energy = kept / total if total else 1.0
    error = (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0
    return a, b, ModuleReport("", k, energy, error)


def _check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    for name, ref in base.tensors.items():
        other = tuned.tensors.get(name)
        if other is None:
            raise IncompatibleModels(f"tensor '{name}' is in base '{base.path}' but not in '{tuned.path}'")
        if tuple(other.shape) != tuple(ref.shape):
            raise IncompatibleModels(f"tensor '{name}' is {list(ref.shape)} in base '{base.path}' but "
                                     f"{list(other.shape)} in '{tuned.path}'")
    extra = sorted(set(tuned.tensors) - set(base.tensors))
    if extra:
        raise IncompatibleModels(f"tensor '{extra[0]}' is in '{tuned.path}' but not in base '{base.path}'")


def _skipped_deltas(base: Checkpoint, tuned: Checkpoint, chosen: set[str]) -> list[SkippedDelta]:
    """Norms of the non-zero deltas that the adapter does not carry, largest first."""
    skipped = []
    for name, ref in base.tensors.items():
        if name in chosen or not ref.dtype.is_floating_point:
            continue
        before = base.read(name).float()
        delta = tuned.read(name).float() - before
        norm = delta.norm().item()
        if norm > 0:
            skipped.append(SkippedDelta(name, norm, norm / max(before.norm().item(), 1e-30)))
        base.release(name)
        tuned.release(name)
    return sorted(skipped, key=lambda s: -s.norm)


def _task_type(config: dict) -> str | None:
    archs = config.get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


def _adapter_config(base_dir: Path, base: Checkpoint, targets: list[str], ranks: dict[str, int],
                    alpha: float | None) -> dict:
    r, rank_pattern = rank_layout(ranks)
    return {
        "peft_type": "LORA", "task_type": _task_type(base.config), "base_model_name_or_path": str(base_dir),
        "r": r, "lora_alpha": alpha if alpha is not None else r, "target_modules": targets,
        "rank_pattern": rank_pattern,
        # without a fixed alpha every module gets alpha = its rank, i.e. scaling 1
        "alpha_pattern": {} if alpha is not None else dict(rank_pattern),
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }


def extract_adapter(base_dir: str | Path, finetuned_dir: str | Path, out_dir: str | Path, *, rank: int | None = None,
                    energy: float | None = None, target_modules: Sequence[str] | None = None,
                    alpha: float | None = None, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter approximating `finetuned_dir − base_dir` on the linear weights.

    `rank` fixes the rank; `energy` picks, per module, the smallest rank keeping that fraction of the squared
    singular values (at most `rank` when both are given); ranks that differ go to `rank_pattern`. `alpha`
    sets lora_alpha (default: each module's rank, so scaling is 1); B absorbs 1/scaling either way.
    Deltas of tensors that are not LoRA targets are skipped with a warning naming the largest; the per-module
    ranks, kept energy and skipped deltas are written to mergegate_extraction.json beside the adapter.
    """
    options = ExtractOptions(rank, energy, tuple(target_modules) if target_modules is not None else None, alpha)
    validate(options)
    check_output(Path(out_dir), overwrite)  # fail before the SVDs, not after
    base_dir = Path(base_dir).absolute()
    base = Checkpoint(base_dir, allow_pickle=allow_pickle)
    tuned = Checkpoint(finetuned_dir, allow_pickle=allow_pickle)
    _check_pair(base, tuned)
    chosen = select_targets(base, options.target_modules)
    if not chosen:
        raise RecipeError(f"extract: '{base_dir}' has no 2-D linear weights to extract")
    modules: dict[str, LoraWeights] = {}
    reports: list[ModuleReport] = []
    for name in chosen:
        dtype = tuned.tensors[name].dtype
        delta = tuned.read(name).float() - base.read(name).float()
        base.release(name)
        tuned.release(name)
        if not torch.isfinite(delta).all():
            raise IncompatibleModels(f"tensor '{name}' has non-finite values in '{base.path}' or '{tuned.path}'")
        a, b, report = factorize(delta, options)
        module = name.removesuffix(".weight")
        scaling = (alpha / report.rank) if alpha is not None else 1.0
        modules[name] = LoraWeights(module, a.to(dtype), (b / scaling).to(dtype))
        reports.append(ModuleReport(module, report.rank, report.energy_kept, report.relative_error))
    skipped = _skipped_deltas(base, tuned, set(chosen))
    if skipped:
        top = skipped[0]
        warnings.warn(f"extract: {len(skipped)} changed tensor(s) are not LoRA targets and are left out of the "
                      f"adapter; the largest is '{top.tensor}' (delta norm {top.norm:.4g}, {top.relative:.2%} of "
                      "the base tensor)", stacklevel=2)
    config = _adapter_config(base_dir, base, config_targets(chosen, base),
                             {r.module: r.rank for r in reports}, alpha)
    summary = {"base": str(base_dir), "finetuned": str(Path(finetuned_dir).absolute()),
               "modules": [asdict(r) for r in reports], "skipped": [asdict(s) for s in skipped]}
    with staged(Path(out_dir), overwrite) as staging:
        write_adapter_files(staging, config, modules)
        (staging / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return Path(out_dir).absolute()
