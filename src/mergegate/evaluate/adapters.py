"""Adapters kept apart on one shared base: the base loaded once and every adapter loaded on it by name with PEFT
(`PeftModel.from_pretrained(base, first, adapter_name=...)`, then `load_adapter`), one adapter active at a time
(`set_adapter`), or none (`disable_adapter()`: the base alone). No adapter copies the base: each adds only its
LoRA matrices. `held_parameter_bytes` says what loaded modules hold, counted once per storage.

An `AdapterCandidate` (the cohort's own adapter per row, or a learned router's pick: `adapter_router`) is
evaluated like any model (`evaluate_adapter_candidate`): rows grouped by their adapter, batched, recorded and
cached in the registry, so the gate decides on it as on a merge."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import EvaluationError
from ..model_ref import ModelRef, Role
from ..registry import Registry, RowResult
from .adapter_router import AdapterRouter, fit_router, load_labelled_calibration
from .local import _library_versions, run_config, torch_threads
from .options import EvalOptions
from .runner import ModelRun
from .suite import Suite, SuiteRow


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


@torch.no_grad()
def prompt_features(model: Any, prompt_ids: Sequence[Sequence[int]], pad_token_id: int,
                    batch_size: int = 16) -> torch.Tensor:
    """(n, hidden) mean of the base's last hidden state over each prompt's tokens, every adapter disabled."""
    from .local import _left_padded

    found = []
    with use_adapter(model, None):
        for start in range(0, len(prompt_ids), batch_size):
            encoded = _left_padded([list(ids) for ids in prompt_ids[start:start + batch_size]], pad_token_id)
            encoded = encoded.to(model.device)
            hidden = model(**encoded, output_hidden_states=True).hidden_states[-1].float()
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            found.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu())
    return torch.cat(found)


def train_router(model: Any, tokenizer: Any, base: Path, adapters: Mapping[str, Path], routes: Mapping[str, str],
                 calibration: str | Path) -> AdapterRouter:
    """A router (`adapter_router`) fitted on the calibration file's rows, `model` the shared base (`load_shared`)."""
    rows = load_labelled_calibration(calibration)
    features = prompt_features(model, [tokenizer(text)["input_ids"] for text, _ in rows], tokenizer.pad_token_id)
    trained_on = {"calibration": Path(calibration).name, "rows": len(rows),
                  "calibration_sha256": hashlib.sha256(Path(calibration).read_bytes()).hexdigest()}
    return fit_router(features, [cohort for _, cohort in rows], base, adapters, routes, trained_on)


@dataclass(frozen=True)
class AdapterCandidate:
    """A candidate served as adapters on one shared base (evaluated like any model, `evaluate_adapter_candidate`):
    each row answered by the adapter its cohort's route names (`routes`: cohort → adapter; a cohort not named:
    the base alone), or, with a `router`, by the adapter the router picks from the row's prompt."""

    name: str
    base: Path
    adapters: dict[str, Path]
    routes: dict[str, str] = field(default_factory=dict)
    router: AdapterRouter | None = None

    def model_hash(self) -> str:
        """The candidate's identity: the base's and every adapter's files, and what picks a row's adapter."""
        from ..io.hashing import folder_hash

        shape = {"base": folder_hash(self.base), "adapters": {n: folder_hash(p) for n, p in self.adapters.items()},
                 "pick": self.router.identity() if self.router is not None else self.routes}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    def picks(self, model: Any, tokenizer: Any, rows: Sequence[SuiteRow],
              prompt_ids: Sequence[Sequence[int]]) -> list[str | None]:
        if self.router is None:
            return [self.routes.get(row.cohort) for row in rows]
        return self.router.pick(prompt_features(model, prompt_ids, tokenizer.pad_token_id))


def run_candidate_rows(candidate: AdapterCandidate, model_hash: str, rows: list[SuiteRow], *, batch_size: int,
                       max_new_tokens: int, device: str, on_results: Callable[[list[RowResult]], None]) -> None:
    """The base loaded once with the candidate's adapters; rows grouped by the adapter that answers them, each
    group generated in batches with that adapter active. A router's pick is timed and its share (the mean per
    row) added to each row's latency: routing is part of answering."""
    from .local import _answer_rows, _prompt_ids

    model, tokenizer = load_shared(candidate.base, candidate.adapters, device)
    started = time.perf_counter()
    picks = candidate.picks(model, tokenizer, rows, [_prompt_ids(tokenizer, row, candidate.name) for row in rows])
    routing_ms = (time.perf_counter() - started) * 1000 / max(1, len(rows)) if candidate.router is not None else 0.0
    groups: dict[str | None, list[SuiteRow]] = {}
    for row, adapter in zip(rows, picks):
        groups.setdefault(adapter, []).append(row)
    for adapter, group in groups.items():
        with use_adapter(model, adapter):
            for results in _answer_rows(model, tokenizer, candidate.name, model_hash, group, batch_size,
                                        max_new_tokens):
                on_results([replace(r, latency_ms=r.latency_ms + routing_ms) for r in results])


def evaluate_adapter_candidate(candidate: AdapterCandidate, suite: Suite, registry: Registry,
                               options: EvalOptions | None = None, role: Role = "candidate") -> ModelRun:
    """`runner.evaluate_models` for an adapter candidate: the same registry, cache key rules and results (its
    model hash from `AdapterCandidate.model_hash`, its config the base's run config marked as adapters applied
    unmerged on a shared base)."""
    from ..progress import Progress
    from .runner import _cached_or_opened, _finished

    options = options if options is not None else EvalOptions()
    device = options.resolved_device
    model_hash = candidate.model_hash()
    ref = ModelRef(candidate.name, candidate.base)
    registry.register_model(candidate.name, candidate.base, role=role, model_hash=model_hash)
    config = {**run_config(ref, suite, max_new_tokens=options.max_new_tokens, device=device),
              "adapters": "shared base, unmerged", "libraries": _library_versions(True)}
    with torch_threads(options.threads), Progress(options.progress) as bar:
        opened = _cached_or_opened(ref, role, model_hash, config, suite, registry, bar, options.force)
        if isinstance(opened, ModelRun):
            return opened
        if opened.rows:
            run_candidate_rows(candidate, model_hash, opened.rows, batch_size=options.batch_size,
                               max_new_tokens=options.max_new_tokens, device=device,
                               on_results=lambda results: opened.record(registry, results))
        return _finished(opened, suite, registry)
