"""Run N models on the same suite rows: batched greedy generation, scores, per-row records in the registry.

A model already evaluated on this exact suite with the same run config is read from the registry instead of
re-run; an interrupted run resumes with the rows it had not finished. The cache key is (model hash, suite hash,
config hash): the model hash covers the files that change an answer (weights, config, generation config,
tokenizer and chat template, adapter; `io.hashing.folder_hash`), the config everything else (`run_config`).

Batch size and thread count are not in the key: each row's answer does not depend on the rows it is batched
with (its token budget is its own, prompts are left-padded under an attention mask, greedy decoding), so they
change only the speed. Padding can in principle move a logit by float rounding; on the demo models greedy
outputs are identical across batch sizes (tests/test_registry_runner.py checks it).

Each row's latency is its own: from its batch's start until the generation step that completed its answer (a
per-step timestamp from a stopping criterion that never stops), plus its own likelihood pass if any (see
RowResult.latency_ms). It is measured, not part of the answer, so it depends on batch size and machine.

`device` picks where models run: "cpu" (float32) or "cuda"/"cuda:N" (bfloat16); the default is "cuda" when
torch sees a GPU, else "cpu". A bf16 answer can differ from an fp32 one, so the dtype (and, off the CPU, the
device) is in the cache key (`run_config`); a CPU run keys exactly as before devices existed.

`workers` > 1 (CLI `--workers 2`) or a `ray_address` (`--ray-address ray://HEAD:10001`) runs the rows still to
run as Ray tasks, shards of rows × models (`evaluate.sharded`; the `ray` extra); cache checks, resumes and every
registry write stay in this process, and the answers are the same as in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..devices import check_device, default_device
from ..errors import EvaluationError, RegistryError
from ..progress import Advance, Progress
from ..model_ref import ModelRef, Role
from ..registry import Registry, RowResult
from . import endpoint as _endpoint
from .endpoint import EndpointSettings
from .evaluators import Observation, evaluator_identity, needs_likelihood, score_row
from .options import EvalOptions
from .suite import Suite, SuiteRow

# The runner's prompt format and generation procedure: the raw prompt through the model's own tokenizer
# (its special tokens, no chat template applied; a chat row's messages through the chat template, whose text
# holds any BOS itself: `_prompt_ids`), left padding, fp32 on the CPU (bf16 on CUDA), greedy decoding with
# GENERATION (merged by transformers with the model's generation_config.json, which the model hash covers),
# each row cut at its own budget min(max_new_tokens, 2 * tokens of `expected` + 8), decoded without special
# tokens; NLL computed row by row. Bump it with any change to `_run_batch`/`_mean_nll` that can change an answer
# or what a recorded measure means (3: latency_ms is per row, no longer the batch's wall time).
RUNNER_FORMAT = "3"
GENERATION = {"do_sample": False, "num_beams": 1}


@dataclass(frozen=True)
class ModelRun:
    ref: ModelRef
    role: Role
    model_hash: str
    run_id: int
    cached: bool  # read from the registry, not generated now
    results: list[RowResult]


def _local_folder(ref: ModelRef) -> Path:
    if ref.path is None:  # evaluation reaches a url model through evaluate.endpoint, never through this
        raise EvaluationError(f"model '{ref.name}': {ref.url} is a remote model; it is called through its server, "
                              "not loaded (give a local folder)")
    return ref.path


def device_dtype(device: str) -> torch.dtype:
    """The weights' dtype on `device`: bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(ref: ModelRef, device: str | None = None):
    """Model and tokenizer for generation on `device` (default: "cuda" when torch sees a GPU, else "cpu"; float32
    on the CPU, bfloat16 on CUDA), from a local folder, with its adapter if any."""
    device = check_device(device if device is not None else default_device(), EvaluationError)
    path = _local_folder(ref)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=device_dtype(device))
        if ref.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ref.adapter).merge_and_unload()
        if device != "cpu":
            model = model.to(device)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        where = f"{path}" + (f" with adapter {ref.adapter}" if ref.adapter else "")
        raise EvaluationError(f"model '{ref.name}' ({where}) cannot be loaded: {exc}") from None
    model.eval()
    return model, tokenizer


def check_models(models: Sequence[ModelRef], endpoint: EndpointSettings) -> None:
    """Refuse an empty or ambiguous list of models, a url model's own bad endpoint settings (over the command's
    `endpoint`) and missing model folders before anything is loaded or recorded (EvaluationError). The
    settings themselves were checked when their EvalOptions was made."""
    problems = []
    if not models:
        problems.append("no models to evaluate")
    names = [ref.name for ref in models]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        problems.append(f"model name(s) given twice: {', '.join(duplicated)}")
    for ref in models:
        if ref.endpoint is not None:  # its own settings (a models file's block) over the command's
            own = ref.endpoint_settings(endpoint).problems()
            problems += [f"model '{ref.name}': {problem}" for problem in own]
        # a url model has no folders: its server is reached when it is evaluated (evaluate.endpoint)
        problems += [f"model '{ref.name}': {problem}" for problem in ref.folder_problems()]
    if problems:
        raise EvaluationError("evaluate: " + "; ".join(problems))


def _library_versions(adapter: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "tokenizers", *(("peft",) if adapter else ())):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_config(ref: ModelRef, suite: Suite, *, max_new_tokens: int, device: str = "cpu") -> dict:
    """Everything besides the model files and the suite that can change an answer or a score: part of the
    cache key. Batch size and threads are left out on purpose (see the module docstring).

    The weights' dtype follows `device` (float32 on the CPU, bfloat16 on CUDA). Off the CPU the device kind
    ("cuda", not its index: any GPU of a machine answers alike) is recorded too; on the CPU it is left out, so a
    CPU run keeps the key it had before devices existed."""
    generation = {**GENERATION, "max_new_tokens": max_new_tokens,
                  "dtype": str(device_dtype(device)).removeprefix("torch.")}
    if device != "cpu":
        generation["device"] = device.partition(":")[0]
    return {
        "runner": RUNNER_FORMAT,
        "generation": generation,
        "adapter": ref.adapter is not None,  # the adapter's files are in the model hash
        "evaluators": evaluator_identity(name for row in suite.rows for name in row.evaluators),
        "libraries": _library_versions(ref.adapter is not None),
    }


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def evaluate_models(models: Sequence[tuple[ModelRef, Role]], suite: Suite, registry: Registry,
                    options: EvalOptions | None = None) -> dict[str, ModelRun]:
    """Evaluate every (model, role) on every row of `suite` as `options` say (default EvalOptions()); results
    keyed by model name. The role is recorded in the registry beside the model. A url model is called through
    its server (evaluate.endpoint, with `options.endpoint`); perplexity rows are refused for it (EvaluationError).

    `options.device` is where the models run (default: "cuda" when torch sees a GPU, else "cpu").

    `options.threads` sets torch's intra-op threads for the run (default: half the cores, at least one): small
    models gain little from more, and oversubscribed OpenMP threads slow everything sharing the machine.

    `options.workers` > 1 or a `ray_address` runs the rows as Ray shards (`sharded`: rows × models, one CPU and,
    on CUDA, one GPU each); the default (None or 1, no address) runs them in this process. Either way the
    answers, the cache and the registry are the same.
    """
    options = options if options is not None else EvalOptions()
    check_models([ref for ref, _ in models], options.endpoint)
    for ref, _ in models:
        if ref.is_remote:
            _endpoint.check_rows(ref, suite.rows)
        else:
            check_chat_template(ref, suite.rows)
    device = options.resolved_device
    threads_before = torch.get_num_threads()
    torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        return _evaluate(models, suite, registry, options, device)
    finally:
        torch.set_num_threads(threads_before)


def _evaluate(models: Sequence[tuple[ModelRef, Role]], suite: Suite, registry: Registry, options: EvalOptions,
              device: str) -> dict[str, ModelRun]:
    """Cache checks, opened runs, resumes and finished runs here, in this process (the registry's one writer);
    the rows still to run go through `run_model_rows` model by model, or as Ray shards (`sharded`)."""
    runs: dict[str, ModelRun] = {}
    row_ids = [row.id for row in suite.rows]

    def finish(todo: PendingRun) -> None:
        registry.finish_run(todo.run_id, row_ids)  # refused unless every suite row has a result
        results = _in_suite_order(registry.results(todo.run_id, todo.ref.name), suite, registry, todo.run_id)
        runs[todo.ref.name] = ModelRun(todo.ref, todo.role, todo.model_hash, todo.run_id, False, results)

    max_new_tokens, force, endpoint = options.max_new_tokens, options.force, options.endpoint
    with Progress(options.progress) as bar:
        pending = []
        for ref, role in models:
            opened = (_open_remote(ref, role, suite, registry, max_new_tokens, bar, force, endpoint) if ref.is_remote
                      else _open_local(ref, role, suite, registry, max_new_tokens, bar, force, device))
            if isinstance(opened, ModelRun):
                runs[ref.name] = opened
            else:
                pending.append(opened)
        if options.sharded:
            from .sharded import run_sharded

            run_sharded(pending, registry, options, device)
            for todo in pending:
                finish(todo)
        else:
            for todo in pending:
                run_model_rows(todo.ref, todo.model_hash, todo.rows, batch_size=options.batch_size,
                               max_new_tokens=max_new_tokens, device=device, endpoint=endpoint, budgets=todo.budgets,
                               on_results=partial(todo.record, registry))
                finish(todo)
    return {ref.name: runs[ref.name] for ref, _ in models}


@dataclass(frozen=True)
class PendingRun:
    """A model's opened run and the suite rows it still lacks (all of them, or those an interrupted run left)."""

    ref: ModelRef
    role: Role
    model_hash: str
    run_id: int
    rows: list[SuiteRow]
    advance: Advance  # its progress bar
    budgets: dict[str, int] | None = None  # a url model's token budget per row (endpoint.prepare)

    def record(self, registry: Registry, results: list[RowResult]) -> None:
        registry.add_results(self.run_id, results)  # committed as they come: a crash loses one batch
        self.advance(len(results))


def _open_local(ref: ModelRef, role: Role, suite: Suite, registry: Registry, max_new_tokens: int, bar, force: bool,
                device: str) -> ModelRun | PendingRun:
    """A local model's cached run, or its opened (or resumed) run with the rows still to run."""
    model_hash = registry.register_model(ref.name, _local_folder(ref), role=role, adapter=ref.adapter)
    config = run_config(ref, suite, max_new_tokens=max_new_tokens, device=device)
    return _cached_or_opened(ref, role, model_hash, config, suite, registry, bar, force)


def _open_remote(ref: ModelRef, role: Role, suite: Suite, registry: Registry, max_new_tokens: int, bar, force: bool,
                 settings: EndpointSettings) -> ModelRun | PendingRun:
    """The same for a url model, keyed by what its server reports (evaluate.endpoint): the same registry, cache
    rules and results."""
    prepared = _endpoint.prepare(ref, suite.rows, max_new_tokens, settings)
    model_hash = registry.register_remote(ref.name, str(ref.url), _endpoint.identity_hash(prepared.identity),
                                          role=role, identity=prepared.identity)
    evaluators = evaluator_identity(name for row in suite.rows for name in row.evaluators)
    config = _endpoint.run_config(ref, evaluators, max_new_tokens=max_new_tokens, budget_mode=prepared.budget_mode,
                                  runner_format=RUNNER_FORMAT)
    return _cached_or_opened(ref, role, model_hash, config, suite, registry, bar, force, budgets=prepared.budgets)


def _cached_or_opened(ref: ModelRef, role: Role, model_hash: str, config: dict, suite: Suite, registry: Registry,
                      bar, force: bool, budgets: dict[str, int] | None = None) -> ModelRun | PendingRun:
    key = config_hash(config)
    cached = None if force else registry.cached_run(model_hash, suite.sha256, key, [row.id for row in suite.rows])
    if cached is not None:
        results = _in_suite_order(registry.results(cached, ref.name), suite, registry, cached)
        return ModelRun(ref, role, model_hash, cached, True, results)
    run_id = registry.open_run(model_hash, suite.sha256, key, config)
    done = registry.done_rows(run_id)
    advance = bar.task(f"evaluating {ref.name}", len(suite.rows), completed=len(done), unit="rows")
    return PendingRun(ref, role, model_hash, run_id, [row for row in suite.rows if row.id not in done], advance,
                      budgets)


def run_model_rows(ref: ModelRef, model_hash: str, rows: list[SuiteRow], *, batch_size: int, max_new_tokens: int,
                   device: str, endpoint: EndpointSettings, budgets: dict[str, int] | None,
                   on_results: Callable[[list[RowResult]], None]) -> None:
    """Run one model on `rows`: a local model loaded on `device` and generated in length-bucketed batches, a url
    model through its server (`budgets` from endpoint.prepare). `on_results` gets each batch's results (a url
    model's: each row's) as they are done, in the calling thread. Used in this process and by each Ray shard."""
    if not rows:
        return
    if ref.is_remote:
        _endpoint.run_rows(ref, model_hash, rows, budgets or {}, endpoint, lambda result: on_results([result]))
        return
    model, tokenizer = load_model(ref, device)
    for batch in _batches(rows, batch_size):
        on_results(_run_batch(model, tokenizer, ref.name, model_hash, batch, max_new_tokens))
    del model


def _in_suite_order(results: list[RowResult], suite: Suite, registry: Registry, run_id: int) -> list[RowResult]:
    """One result per suite row, in the suite's order — however the rows were batched or stored."""
    by_id = {r.row_id: r for r in results}
    missing = [row.id for row in suite.rows if row.id not in by_id]
    if missing:
        raise RegistryError(f"registry {registry.path}: run {run_id} has no result for row(s) {missing[:3]}")
    return [by_id[row.id] for row in suite.rows]


def length_order(row: SuiteRow) -> tuple[int, str]:
    """Rows sorted by this key have similar prompt lengths together (less padding), in a deterministic order."""
    return len(row.asked), row.id


def _batches(rows: list[SuiteRow], size: int):
    """Similar prompt lengths together (less padding), in a deterministic order."""
    ordered = sorted(rows, key=length_order)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


class _StepClock:
    """A stopping criterion that never stops: it timestamps each generation step as its token is appended (the
    first step's stamp includes the prefill). `stamps[k]` is when every row's (k+1)-th new token existed."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # a bool per row
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def _run_batch(model, tokenizer, name: str, model_hash: str, rows: list[SuiteRow], max_new_tokens: int):
    from transformers import StoppingCriteriaList

    prompt_ids = [_prompt_ids(tokenizer, row, name) for row in rows]  # refuses a chat without a template first
    started = time.perf_counter()
    encoded = _left_padded(prompt_ids, tokenizer.pad_token_id).to(model.device)
    # A correct answer is about as long as the expected one: twice that, plus slack, bounds a row's generation
    # without cutting an answer that could still be right. Each row is cut at its own budget, so its answer
    # does not depend on which rows share its batch.
    budgets = [min(max_new_tokens, 2 * len(tokenizer(row.expected, add_special_tokens=False)["input_ids"]) + 8)
               for row in rows]
    clock = _StepClock()
    generated = model.generate(**encoded, max_new_tokens=max(budgets), **GENERATION,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               stopping_criteria=StoppingCriteriaList([clock]))
    new_tokens = generated[:, encoded["input_ids"].shape[1]:].cpu()
    nlls, nll_ms = {}, {}
    for row in rows:
        if needs_likelihood(row):  # timed per row: a row's own likelihood pass is part of its latency
            nll_started = time.perf_counter()
            nlls[row.id] = _mean_nll(model, tokenizer, row, prompt_ids[rows.index(row)])
            nll_ms[row.id] = (time.perf_counter() - nll_started) * 1000
    results = []
    for i, row in enumerate(rows):
        completion = new_tokens[i, :budgets[i]]
        ended = (completion == tokenizer.eos_token_id).nonzero()
        length = int(ended[0, 0]) + 1 if len(ended) else int((completion != tokenizer.pad_token_id).sum())
        # The step that completed this row's answer: its EOS, or else its own budget (the batch may run on for
        # longer rows, but this row's answer was final by then).
        done_step = min(length if len(ended) else budgets[i], len(clock.stamps))
        latency_ms = (clock.stamps[done_step - 1] - started) * 1000 + nll_ms.get(row.id, 0.0)
        output = tokenizer.decode(completion[:length], skip_special_tokens=True)
        scores = score_row(row, Observation(output=output, mean_nll=nlls.get(row.id)))
        details = {k: {"score": v.score, "passed": v.passed, "reason": v.reason} for k, v in scores.items()}
        results.append(RowResult(
            row.id, row.cohort, name, model_hash, output, int(encoded["attention_mask"][i].sum()), length,
            latency_ms, min(v.score for v in scores.values()), all(v.passed for v in scores.values()), details))
    return results


def _prompt_ids(tokenizer, row: SuiteRow, name: str) -> list[int]:
    """The tokens a row asks. A prompt: the tokenizer's own encoding, special tokens included (as always). A
    chat: the chat template's text (`add_generation_prompt`), encoded without special tokens, since a template
    writes the BOS it wants itself (the demo's does: with them it would be doubled) — as the gateway renders
    a chat. A chat for a model without a template is refused (EvaluationError), before anything is generated."""
    if row.messages is None:
        return tokenizer(row.prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluationError(f"model '{name}': row {row.id} is a chat (messages), but the model's tokenizer has "
                              "no chat template (give the row a 'prompt', or the model a chat_template.jinja)")
    text = tokenizer.apply_chat_template(row.chat(), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_chat_template(ref: ModelRef, rows: Sequence[SuiteRow]) -> None:
    """Refuse chat rows for a local model whose tokenizer has no chat template (EvaluationError naming the model
    and the first such row), reading only the tokenizer, and only when some row is a chat."""
    chats = [row for row in rows if row.messages is not None]
    if not chats or ref.path is None or not (ref.path / "config.json").is_file():
        return  # no chat rows; or a url model, or a folder check_models refuses
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise EvaluationError(f"model '{ref.name}' ({ref.path}): its tokenizer cannot be loaded: {exc}") from None
    _prompt_ids(tokenizer, chats[0], ref.name)


def _left_padded(prompt_ids: list[list[int]], pad_token_id: int):
    """Rows of token ids as one left-padded batch with its attention mask (what the tokenizer's own padding
    gives, for ids encoded each their own way)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})  # moves `.to` a device


def _mean_nll(model, tokenizer, row: SuiteRow, prompt_ids: list[int]) -> float:
    """Mean negative log-likelihood per token of `expected` given what the row asks (`_prompt_ids`)."""
    prompt = torch.tensor([prompt_ids], dtype=torch.long)
    target = tokenizer(row.expected, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, target], dim=1).to(model.device)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100
    return float(model(input_ids=ids, labels=labels).loss)
