"""One local model on suite rows: loaded from its folder (with its adapter, if any) on a device, greedy
generation (`evaluate.decoding`: finished rows leave the batch and waiting rows take their places, shared prompt
prefixes computed once), scores and per-row latency, the likelihood of `expected` for perplexity rows; and the run
config (the cache key's part besides the model files and the suite) its answers depend on. `evaluate.runner`
decides which rows run; `evaluate.sharded` runs them, here or in Ray workers.

Batch size and thread count are not in the key: each row's answer does not depend on the rows it is batched
with (its token budget is its own, its prompt and answer sit in the cache under an attention mask at the positions
they would have alone, greedy decoding), so they change only the speed. Batching can in principle move a logit
by float rounding; on the demo models and SmolLM2-135M-Instruct greedy outputs are identical to `model.generate`
on each row alone, across batch sizes (tests/evaluate/test_decoding.py checks the demo's). A model that
`decoding.supports` does not cover (a sliding-window cache, a generation config that adds logits processors)
runs through `model.generate` in left-padded, length-bucketed batches instead.

Each row's latency is its own: from when it entered the batch (its prefill; with `model.generate`, its batch's
start) until the generation step that completed its answer, plus its own likelihood pass if any (see
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
from . import decoding
from .evaluators import Observation, evaluator_identity, needs_likelihood, score_row
from .suite import Suite, SuiteRow, answer_budget

# The runner's prompt format and generation procedure: the raw prompt through the model's own tokenizer
# (its special tokens, no chat template applied; a chat row's messages through the chat template, whose text
# holds any BOS itself: `_prompt_ids`), fp32 on the CPU (bf16 on CUDA), greedy decoding as `model.generate` with
# GENERATION does it (merged by transformers with the model's generation_config.json, which the model hash
# covers), each row cut at its own budget min(max_new_tokens, 2 * tokens of `expected` + 8), decoded without
# special tokens; NLL computed row by row. Bump it with any change to the generation (`decoding`,
# `_generate_batch`) or `_mean_nll` that can change an answer or what a recorded measure means (3: latency_ms is
# per row, no longer the batch's wall time; 4: rows enter and leave the batch as others finish and share their
# prompts' prefix cache, which can move a logit by float rounding, and a row's latency starts when it enters).
RUNNER_FORMAT = "4"
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
    """Load the model on `device` and answer `rows`, at most `batch_size` of them generated together;
    `on_results` gets results as rows are done."""
    model, tokenizer = load_model(ref, device)
    for results in _answer_rows(model, tokenizer, ref.name, model_hash, rows, batch_size, max_new_tokens):
        on_results(results)
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


def _batches(rows: list[SuiteRow], size: int) -> Iterator[list[int]]:
    """The indices of `rows` in batches of `size`: similar prompt lengths together (less padding), in a
    deterministic order."""
    ordered = sorted(range(len(rows)), key=lambda i: length_order(rows[i]))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def _answer_rows(model, tokenizer, name: str, model_hash: str, rows: list[SuiteRow], batch_size: int,
                 max_new_tokens: int) -> Iterator[list[RowResult]]:
    """Every row's result, in lists as rows are done. A chat for a model without a template is refused before
    anything is generated. Likelihood rows come last, after generation, each with its own likelihood pass."""
    prompt_ids = [_prompt_ids(tokenizer, row, name) for row in rows]
    budgets = [answer_budget(len(tokenizer(row.expected, add_special_tokens=False)["input_ids"]), max_new_tokens)
               for row in rows]
    if not decoding.supports(model, prompt_ids, tokenizer.eos_token_id):
        for batch in _batches(rows, batch_size):
            yield _generate_batch(model, tokenizer, name, model_hash, [rows[i] for i in batch],
                                  [prompt_ids[i] for i in batch], [budgets[i] for i in batch])
        return
    likelihood_rows: list[tuple[int, list[int], float]] = []
    for answers in decoding.greedy_answers(model, prompt_ids, budgets, eos=tokenizer.eos_token_id, slots=batch_size,
                                           clock=time.perf_counter):
        done = []
        for answer in answers:
            waited_ms = (answer.done - answer.started) * 1000
            if needs_likelihood(rows[answer.index]):
                likelihood_rows.append((answer.index, answer.tokens, waited_ms))
            else:
                done.append(_result(tokenizer, name, model_hash, rows[answer.index], len(prompt_ids[answer.index]),
                                    answer.tokens, waited_ms, None))
        if done:
            yield done
    for index, tokens, waited_ms in likelihood_rows:  # after generation: a row's likelihood pass delays no other row
        nll_started = time.perf_counter()
        nll = _mean_nll(model, tokenizer, rows[index], prompt_ids[index])
        latency_ms = waited_ms + (time.perf_counter() - nll_started) * 1000
        yield [_result(tokenizer, name, model_hash, rows[index], len(prompt_ids[index]), tokens, latency_ms, nll)]


def _result(tokenizer, name: str, model_hash: str, row: SuiteRow, prompt_tokens: int, tokens: list[int],
            latency_ms: float, nll: float | None) -> RowResult:
    """A row's result from its new tokens (its EOS last, where it said one)."""
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    scores = score_row(row, Observation(output=output, mean_nll=nll))
    details = {k: {"score": v.score, "passed": v.passed, "reason": v.reason} for k, v in scores.items()}
    return RowResult(row.id, row.cohort, name, model_hash, output, prompt_tokens, len(tokens), latency_ms,
                     min(v.score for v in scores.values()), all(v.passed for v in scores.values()), details)


class _StepClock:
    """A stopping criterion that never stops: it timestamps each generation step as its token is appended (the
    first step's stamp includes the prefill). `stamps[k]` is when every row's (k+1)-th new token existed."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # a bool per row
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def _generate_batch(model, tokenizer, name: str, model_hash: str, rows: list[SuiteRow], prompt_ids: list[list[int]],
                    budgets: list[int]) -> list[RowResult]:
    """One left-padded batch through `model.generate` (for models `decoding.supports` does not cover), run to
    its longest budget; each row cut at its own budget or its EOS."""
    from transformers import StoppingCriteriaList

    started = time.perf_counter()
    encoded = _left_padded(prompt_ids, tokenizer.pad_token_id).to(model.device)
    clock = _StepClock()
    generated = model.generate(**encoded, max_new_tokens=max(budgets), **GENERATION,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               stopping_criteria=StoppingCriteriaList([clock]))
    new_tokens = generated[:, encoded["input_ids"].shape[1]:].cpu()
    results = []
    for i, row in enumerate(rows):
        completion = new_tokens[i, :budgets[i]]
        ended = (completion == tokenizer.eos_token_id).nonzero()
        length = int(ended[0, 0]) + 1 if len(ended) else int((completion != tokenizer.pad_token_id).sum())
        # The step that completed this row's answer: its EOS, or else its own budget (the batch may run on for
        # longer rows, but this row's answer was final by then).
        done_step = min(length if len(ended) else budgets[i], len(clock.stamps))
        latency_ms = (clock.stamps[done_step - 1] - started) * 1000
        nll = None
        if needs_likelihood(row):  # timed per row: a row's own likelihood pass is part of its latency
            nll_started = time.perf_counter()
            nll = _mean_nll(model, tokenizer, row, prompt_ids[i])
            latency_ms += (time.perf_counter() - nll_started) * 1000
        results.append(_result(tokenizer, name, model_hash, row, len(prompt_ids[i]), completion[:length].tolist(),
                               latency_ms, nll))
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


@torch.no_grad()
def _mean_nll(model, tokenizer, row: SuiteRow, prompt_ids: list[int]) -> float:
    """Mean negative log-likelihood per token of `expected` given what the row asks (`_prompt_ids`)."""
    prompt = torch.tensor([prompt_ids], dtype=torch.long)
    target = tokenizer(row.expected, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, target], dim=1).to(model.device)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100
    return float(model(input_ids=ids, labels=labels).loss)
