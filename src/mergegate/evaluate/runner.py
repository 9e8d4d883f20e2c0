"""Run N models on the same suite rows: batched greedy generation, scores, per-row records in the registry.

A model already evaluated on this exact suite (same content hashes) is read from the registry instead of
re-run; an interrupted run resumes with the rows it had not finished.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import Progress
from ..registry import Registry, RowResult
from .evaluators import Observation, needs_likelihood, score_row
from .suite import Suite, SuiteRow


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a Hugging Face folder, optionally with a PEFT adapter on top."""

    name: str
    path: Path
    role: str  # candidate | base | source
    adapter: Path | None = None


@dataclass(frozen=True)
class ModelRun:
    spec: ModelSpec
    model_hash: str
    run_id: int
    cached: bool  # read from the registry, not generated now
    results: list[RowResult]


def load_model(spec: ModelSpec):
    """Model and tokenizer for generation, on the CPU in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


def evaluate_models(models: list[ModelSpec], suite: Suite, registry: Registry, *, batch_size: int = 32,
                    max_new_tokens: int = 64, progress: bool | None = None, force: bool = False,
                    threads: int | None = None) -> dict[str, ModelRun]:
    """Evaluate every model on every row of `suite`; results keyed by model name.

    `threads` sets torch's intra-op threads for the run (default: half the cores, at least one): small
    models gain little from more, and oversubscribed OpenMP threads slow everything sharing the machine.
    """
    show = sys.stderr.isatty() if progress is None else progress
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        return _evaluate(models, suite, registry, batch_size, max_new_tokens, show, force)
    finally:
        torch.set_num_threads(threads_before)


def _evaluate(models, suite, registry, batch_size, max_new_tokens, show, force) -> dict[str, ModelRun]:
    runs = {}
    with Progress(show) as bar:
        for spec in models:
            model_hash = registry.register_model(spec.name, spec.path, role=spec.role, adapter=spec.adapter)
            cached = None if force else registry.cached_run(model_hash, suite.sha256)
            if cached is not None:
                runs[spec.name] = ModelRun(spec, model_hash, cached, True, registry.results(cached, spec.name))
                continue
            run_id = registry.open_run(model_hash, suite.sha256)
            done = registry.done_rows(run_id)
            todo = [row for row in suite.rows if row.id not in done]
            advance = bar.task(f"evaluating {spec.name}", len(suite.rows), completed=len(done), unit="rows")
            if todo:
                model, tokenizer = load_model(spec)
                for batch in _batches(todo, batch_size):
                    results = _run_batch(model, tokenizer, spec.name, model_hash, batch, max_new_tokens)
                    registry.add_results(run_id, results)  # committed per batch: a crash loses one batch
                    advance(len(batch))
                del model
            registry.finish_run(run_id)
            order = {row.id: i for i, row in enumerate(suite.rows)}
            results = sorted(registry.results(run_id, spec.name), key=lambda r: order.get(r.row_id, 0))
            runs[spec.name] = ModelRun(spec, model_hash, run_id, False, results)
    return runs


def _batches(rows: list[SuiteRow], size: int):
    """Similar prompt lengths together (less padding), in a deterministic order."""
    ordered = sorted(rows, key=lambda r: (len(r.prompt), r.id))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


@torch.no_grad()
def _run_batch(model, tokenizer, name: str, model_hash: str, rows: list[SuiteRow], max_new_tokens: int):
    started = time.perf_counter()
    encoded = tokenizer([row.prompt for row in rows], return_tensors="pt", padding=True)
    # A correct answer is about as long as the expected one: twice that, plus slack, bounds the batch's
    # generation without cutting an answer that could still be right.
    longest = max(len(tokenizer(row.expected, add_special_tokens=False)["input_ids"]) for row in rows)
    budget = min(max_new_tokens, 2 * longest + 8)
    generated = model.generate(**encoded, max_new_tokens=budget, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = generated[:, encoded["input_ids"].shape[1]:]
    nlls = {row.id: _mean_nll(model, tokenizer, row) for row in rows if needs_likelihood(row)}
    latency_ms = (time.perf_counter() - started) * 1000  # the batch's wall time: what each caller waited
    results = []
    for i, row in enumerate(rows):
        completion = new_tokens[i]
        ended = (completion == tokenizer.eos_token_id).nonzero()
        length = int(ended[0, 0]) + 1 if len(ended) else int((completion != tokenizer.pad_token_id).sum())
        output = tokenizer.decode(completion[:length], skip_special_tokens=True)
        scores = score_row(row, Observation(output=output, mean_nll=nlls.get(row.id)))
        details = {k: {"score": v.score, "passed": v.passed, "reason": v.reason} for k, v in scores.items()}
        results.append(RowResult(
            row.id, row.cohort, name, model_hash, output, int(encoded["attention_mask"][i].sum()), length,
            latency_ms, min(v.score for v in scores.values()), all(v.passed for v in scores.values()), details))
    return results


def _mean_nll(model, tokenizer, row: SuiteRow) -> float:
    """Mean negative log-likelihood per token of `expected` given `prompt`."""
    prompt = tokenizer(row.prompt, return_tensors="pt")["input_ids"]
    target = tokenizer(row.expected, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, target], dim=1)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100
    return float(model(input_ids=ids, labels=labels).loss)
