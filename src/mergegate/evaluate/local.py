"""One local model on suite rows: loaded from its folder (with its adapter, if any) on a device, batched greedy
generation, scores and per-row latency, the likelihood of `expected` for perplexity rows; and the run config (the
cache key's part besides the model files and the suite) its answers depend on. `evaluate.runner` decides which rows
run; `evaluate.sharded` runs them, here or in Ray workers.

Batch size and thread count are not in the key: each row's answer does not depend on the rows it is batched
with (its token budget is its own, prompts are left-padded under an attention mask, greedy decoding), so they
change only the speed. Padding can in principle move a logit by float rounding; on the demo models greedy
outputs are identical across batch sizes (tests/test_registry_runner.py checks it).

Each row's latency is its own: from its batch's start until the generation step that completed its answer (a
per-step timestamp from a stopping criterion that never stops), plus its own likelihood pass if any (see
RowResult.latency_ms). It is measured, not part of the answer, so it depends on batch size and machine.

The device picks where models run: "cpu" (float32) or "cuda"/"cuda:N" (bfloat16); the default is "cuda" when
torch sees a GPU, else "cpu". A bf16 answer can differ from an fp32 one, so the dtype (and, off the CPU, the
device) is in the cache key (`run_config`); a CPU run keys exactly as before devices existed.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..devices import check_device, default_device
from ..errors import EvaluationError
from ..model_ref import ModelRef
from ..registry import RowResult
from .evaluators import Observation, evaluator_identity, needs_likelihood, score_row
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


def local_folder(ref: ModelRef) -> Path:
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
    path = local_folder(ref)
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


def run_rows(ref: ModelRef, model_hash: str, rows: list[SuiteRow], *, batch_size: int, max_new_tokens: int,
             device: str, on_results: Callable[[list[RowResult]], None]) -> None:
    """Load the model on `device` and generate `rows` in length-bucketed batches; `on_results` gets each batch's
    results as it is done."""
    model, tokenizer = load_model(ref, device)
    for batch in _batches(rows, batch_size):
        on_results(_run_batch(model, tokenizer, ref.name, model_hash, batch, max_new_tokens))
    del model


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block (default: half the cores, at least one): small models
    gain little from more, and oversubscribed OpenMP threads slow everything sharing the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or max(1, (os.cpu_count() or 2) // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
