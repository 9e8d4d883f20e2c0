"""Calibration statistics for data-aware merges (fisher, regmean), computed one model at a time and cached.

A calibration file is JSONL: one JSON object per line with a `text` field, or `prompt` and `reference`
fields that are joined into one text (the prompt, a space unless the prompt already ends in whitespace,
then the reference). Blank lines are skipped; only the first `max_rows` rows are read.

For each input model the texts are tokenized with that model's own tokenizer, the model is loaded with
transformers on the CPU in float32, run over the rows, and freed. Two statistics exist:

* `gram` — for every `nn.Linear` module `m`, stored under `m.weight`: the Gram matrix of the layer's
  inputs, G = XᵀX / N over the N real (non-padding) calibration tokens, shape in × in. RegMean needs
  XᵀX; dividing by N keeps values in float32 range and is the same factor for every model. Held and
  stored in float32, one in × in matrix per Linear: RegMean's known cost (about 28 GB for a 7B Llama).
* `fisher` — for every parameter: the diagonal empirical Fisher. For each row, the gradient of the
  row's log-likelihood of its own next tokens, g = ∇θ Σ_t log p(x_t | x_<t), is squared elementwise;
  F = Σ_rows g² / (number of predicted tokens). The empirical Fisher (labels = the calibration text) is
  used rather than the expected Fisher (labels sampled from the model): it needs no sampling, so the
  statistic — and the merge — is deterministic and byte-reproducible from the cache key, and it costs one
  backward pass per row; the calibration text is meant to be the distribution the merge must serve.
  One gradient per *row* (not per token) keeps the cost at one backward per row; under the model's own
  distribution the per-token score terms are uncorrelated, so dividing by the token count gives a
  per-token Fisher.

Results are written as `statistics.safetensors` in a folder under `$MERGEGATE_CACHE/statistics`
(default `~/.cache/mergegate/statistics`), keyed by the sha256 of the model's files, the sha256 of the
calibration file and the settings, so rerunning a recipe reuses them. The folder also holds a
`config.json` describing the statistics, so it opens as a `Checkpoint`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import CheckpointError, MergegateError, RecipeError
from .io.hashing import HashCache, cache_folder
from .io.read import Checkpoint
from .methods._registry import StatisticKind
from .progress import Progress

STATISTICS_FILE = "statistics.safetensors"
FORMAT = "mergegate.statistics/1"  # bump when the definition of a statistic changes: old cache entries die


@dataclass(frozen=True)
class CalibrationSettings:
    """How much calibration text to use: the recipe's `calibration:` section, without the path."""

    max_rows: int = 64
    max_length: int = 128  # tokens per row, after the tokenizer's own special tokens
    batch_size: int = 8  # rows per forward pass for gram; fisher runs one row at a time (one gradient per row)

    def __post_init__(self):
        for name in ("max_rows", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"calibration.{name} must be at least 1, got {getattr(self, name)}")


# -- calibration text --------------------------------------------------------------------------------
def resolve_calibration_path(path: str, recipe_folder: Path | None) -> Path:
    """Relative to the working directory (as model folders are), else to the recipe's folder."""
    candidate = Path(os.path.expanduser(path))
    if candidate.is_file() or candidate.is_absolute() or recipe_folder is None:
        found = candidate
    else:
        beside = recipe_folder / candidate
        found = beside if beside.is_file() else candidate
    if not found.is_file():
        where = "" if recipe_folder is None or candidate.is_absolute() else f" (nor beside the recipe, {recipe_folder})"
        raise RecipeError(f"calibration.path: no such file '{path}'{where}")
    return found


def load_calibration_texts(path: str | Path, max_rows: int) -> list[str]:
    """The first `max_rows` texts of a calibration JSONL file; a malformed row names the file and line."""
    path = Path(path)
    texts: list[str] = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"calibration file {path}: cannot be read ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if len(texts) >= max_rows:
                break
            if not line.strip():
                continue
            texts.append(_row_text(line, path, number))
    if not texts:
        raise RecipeError(f"calibration file {path}: holds no rows")
    return texts


def _row_text(line: str, path: Path, number: int) -> str:
    where = f"calibration file {path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise RecipeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise RecipeError(f"{where}: 'text' must be a non-empty string")
        return row["text"]
    prompt, reference = row.get("prompt"), row.get("reference")
    if isinstance(prompt, str) and isinstance(reference, str) and (prompt or reference):
        separator = "" if not prompt or prompt[-1].isspace() else " "
        return prompt + separator + reference
    raise RecipeError(f"{where}: needs a 'text' string, or 'prompt' and 'reference' strings "
                      f"(found keys: {', '.join(sorted(row)) or 'none'})")


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_length`; texts that yield no token are dropped."""
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            rows.append(list(ids))
    return rows


def batches(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) per batch, right-padded: causal attention keeps pads out of real tokens."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        yield ids, mask


# -- statistics of one loaded model ------------------------------------------------------------------
def gram_statistics(model: torch.nn.Module, rows: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                    advance=lambda n: None) -> tuple[dict[str, torch.Tensor], int]:
    """XᵀX / N of every nn.Linear's input over the real tokens, keyed `<module>.weight`; and N."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32) for name, m in linears.items()}
    current: dict = {"input": None, "product": None}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            # q/k/v (and gate/up) projections read the same tensor one after the other: one product serves all
            if x is not current["input"]:
                rows_ = x.detach().reshape(-1, x.shape[-1])
                if rows_.shape[0] == current["keep"].numel():  # per-token inputs: drop the padding
                    rows_ = rows_[current["keep"]]
                rows_ = rows_.to(torch.float32)  # (a pooler reads one vector per sequence: nothing to drop)
                current["input"], current["product"] = x, rows_.T @ rows_
            sums[name].add_(current["product"])
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    tokens = 0
    try:
        with torch.no_grad():
            for ids, mask in batches(rows, batch_size, pad_id):
                current["keep"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask)
                current["input"] = current["product"] = None
                tokens += int(mask.sum())
                advance(ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return {f"{name}.weight": total / max(tokens, 1) for name, total in sums.items()}, tokens


def fisher_statistics(model: torch.nn.Module, rows: Sequence[Sequence[int]],
                      advance=lambda n: None) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher of every parameter: Σ_rows (∇ log-likelihood of the row)² / predicted tokens."""
    params = {name: p for name, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    predicted = 0
    for row in rows:
        if len(row) < 2:  # nothing to predict
            advance(1)
            continue
        ids = torch.tensor([row], dtype=torch.long)
        logits = model(input_ids=ids).logits[0, :-1].to(torch.float32)
        log_likelihood = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).sum()
        model.zero_grad(set_to_none=True)
        log_likelihood.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name].add_(p.grad.to(torch.float32).square())
        predicted += len(row) - 1
        advance(1)
    model.zero_grad(set_to_none=True)
    return {name: total / max(predicted, 1) for name, total in sums.items()}, predicted


def compute_statistics(model_path: Path, calibration_path: Path, kind: StatisticKind,
                       settings: CalibrationSettings, *, threads: int | None = None,
                       advance=lambda n: None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load one model, compute `kind` statistics over the calibration rows, free the model.

    `threads` is torch's intra-op thread count for the forward/backward passes (default: the caller's
    current count, which torch sets to the number of physical cores). Returns the tensors and a
    metadata dict (strings, for the safetensors header).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    texts = load_calibration_texts(calibration_path, settings.max_rows)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise CheckpointError(f"model '{model_path}': cannot load its tokenizer for calibration ({exc})") from None
    rows = tokenize(texts, tokenizer, settings.max_length)
    if not rows:
        raise RecipeError(f"calibration file {calibration_path}: no row yields a token with the tokenizer of "
                          f"'{model_path}'")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    threads_before = torch.get_num_threads()
    # explicit, and restored afterwards: the engine later pins one thread per merge worker
    torch.set_num_threads(threads or threads_before)
    bars_before = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar counts rows; transformers' would interleave with it
    model = None
    try:
        architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
        causal = any(a.endswith("ForCausalLM") for a in architectures)
        if kind == "fisher" and not causal:
            raise RecipeError(f"model '{model_path}' ({', '.join(architectures) or 'no architecture'}): fisher needs "
                              "a causal language model, whose next-token likelihood defines the Fisher; regmean "
                              "only needs the layers' inputs and works with encoders too")
        # RegMean only reads the Linear layers' inputs, so encoders (BertModel, ...) load as their bare model
        loader = AutoModelForCausalLM if causal else AutoModel
        try:
            model = loader.from_pretrained(str(model_path), dtype=torch.float32)
        except Exception as exc:  # as above: surface it as a refusal naming the folder
            raise CheckpointError(
                f"model '{model_path}': cannot be loaded with transformers for calibration ({exc})") from None
        model.eval()
        if kind == "gram":
            tensors, tokens = gram_statistics(model, rows, settings.batch_size, pad_id, advance)
        elif kind == "fisher":
            tensors, tokens = fisher_statistics(model, rows, advance)
        else:
            raise ValueError(f"unknown statistic {kind!r}")
    finally:
        del model
        gc.collect()  # free this model before the next one loads
        torch.set_num_threads(threads_before)
        if bars_before:
            hf_logging.enable_progress_bar()
    meta = {"format": FORMAT, "kind": kind, "model": str(Path(model_path).resolve()),
            "calibration": str(Path(calibration_path).resolve()), "rows": str(len(rows)), "tokens": str(tokens),
            **{k: str(v) for k, v in asdict(settings).items()}}
    return tensors, meta


# -- the cache ---------------------------------------------------------------------------------------
def cache_root() -> Path:
    return cache_folder() / "statistics"


def cache_key(model: Checkpoint | Path, calibration_path: Path, kind: StatisticKind, settings: CalibrationSettings,
              hashes: HashCache | None = None) -> str:
    """sha256 over the model's file contents, the calibration file's content, the statistic and settings."""
    hashes = hashes or HashCache()
    files = _checkpoint(model).input_files()
    record = {
        "format": FORMAT,
        "kind": kind,
        "model": {p.name: hashes.sha256(p) for p in files},
        "calibration": hashes.sha256(Path(calibration_path)),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def ensure_statistics(model: Checkpoint | Path, calibration_path: Path, kind: StatisticKind,
                      settings: CalibrationSettings, *, cache_dir: Path | None = None, threads: int | None = None,
                      advance=lambda n: None) -> Path:
    """The cache folder holding this model's statistics, computing them only when absent."""
    model = _checkpoint(model)
    model_path = model.path
    hashes = HashCache()
    key = cache_key(model, Path(calibration_path), kind, settings, hashes)
    hashes.save()  # the provenance hasher then finds these digests
    root = Path(cache_dir) if cache_dir else cache_root()
    folder = root / f"{kind}-{key[:32]}"
    if _usable(folder):
        return folder
    tensors, meta = compute_statistics(Path(model_path), Path(calibration_path), kind, settings,
                                       threads=threads, advance=advance)
    _write_entry(folder, tensors, meta)
    return folder


def _checkpoint(model: Checkpoint | Path) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else Checkpoint(model)


def _usable(folder: Path) -> bool:
    if not (folder / STATISTICS_FILE).is_file():
        return False
    try:
        Checkpoint(folder)
    except MergegateError:
        return False  # a damaged entry is recomputed
    return True


def _write_entry(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write into a private folder, then rename: readers never see half an entry."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / STATISTICS_FILE, metadata=meta)
        description = json.dumps({"mergegate_statistics": meta}, indent=2, sort_keys=True)
        (staging / "config.json").write_text(description + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            if not _usable(folder):  # another process won the race with a good entry: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- for the planner ---------------------------------------------------------------------------------
def plan_statistics(recipe, kind: StatisticKind, models: dict[str, Checkpoint], *, method: str,
                    progress: bool | None = None) -> dict[str, Checkpoint]:
    """Each model's statistics (model reference → opened cache entry), for a data-aware recipe.

    Refuses a recipe without a `calibration:` section, and statistics whose names match none of the
    model's tensors (a model whose transformers parameter names differ from its stored names).
    """
    entries = {entry.model: entry for entry in recipe.models or []}
    own = {ref: entries[ref].calibration for ref in models if ref in entries and entries[ref].calibration}
    if recipe.calibration is None and len(own) < len(models):
        raise RecipeError(
            f"merge_method {method} needs calibration text: add a 'calibration:' section, e.g. "
            "calibration: {path: calib.jsonl, max_rows: 64}, or give every model its own "
            "(models: [{model: ..., calibration: its_data.jsonl}])"
        )
    section = recipe.calibration
    settings = (CalibrationSettings(section.max_rows, section.max_length, section.batch_size) if section
                else CalibrationSettings())
    paths = {ref: resolve_calibration_path(own.get(ref) or section.path, recipe.folder) for ref in models}
    found: dict[str, Checkpoint] = {}
    # refuses a malformed file before any model loads
    rows = {path: len(load_calibration_texts(path, settings.max_rows)) for path in set(paths.values())}
    with Progress(progress) as bar:
        for ref, model in models.items():
            advance = bar.task(f"{kind} statistics of {Path(ref).name}", rows[paths[ref]], unit="rows")
            folder = ensure_statistics(model, paths[ref], kind, settings, advance=advance)
            stats = Checkpoint(folder)
            if not set(model.tensors) & set(stats.tensors):
                raise MergegateError(
                    f"model '{ref}': none of its {kind} statistics ({folder}) matches a tensor name in the "
                    "model's files, so transformers renames its parameters; this model cannot be merged with "
                    f"{method}"
                )
            found[ref] = stats
    return found
