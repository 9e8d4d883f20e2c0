"""Greedy decoding with rows entering and leaving the batch (`evaluate.decoding`) answers every row as
`model.generate` answers it alone, whatever the batch size, the prompt lengths, the budgets and the shared prefixes;
a model it does not cover is run through `model.generate`. On the shipped demo models."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from mergegate.evaluate import decoding
from mergegate.evaluate import local as local_module
from mergegate.evaluate.suite import SuiteRow
from mergegate.model_ref import ModelRef

pytestmark = pytest.mark.one_torch_thread

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
SHARED = "Answer the request below as briefly as you can, in the format it asks for.\n"


def _rows() -> list[SuiteRow]:
    """Demo rows of every generating cohort (short and long prompts, short and long expected answers), each also
    asked after a long instruction they share, and as a chat (the template's BOS shared)."""
    rows, seen = [], {}
    for line in (DEMO / "suite.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "perplexity" in row["evaluators"] or seen.get(row["cohort"], 0) >= 2:
            continue
        seen[row["cohort"]] = seen.get(row["cohort"], 0) + 1
        rows.append(row)
        rows.append({**row, "id": row["id"] + "-shared", "prompt": SHARED + row["prompt"]})
        chat = {key: value for key, value in row.items() if key != "prompt"}
        rows.append({**chat, "id": row["id"] + "-chat", "messages": [{"role": "user", "content": row["prompt"]}]})
    return [SuiteRow.model_validate(row) for row in rows]


@pytest.fixture(scope="module")
def json_model():
    return local_module.load_model(ModelRef("json_output", DEMO / "models" / "json_output"), "cpu")


def _alone(model, tokenizer, prompt: list[int], budget: int) -> list[int]:
    """What `model.generate` answers for this prompt on its own (no padding), cut at its EOS or its budget."""
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                         max_new_tokens=budget, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt):].tolist()


def _cases(tokenizer, rows: list[SuiteRow]) -> tuple[list[list[int]], list[int]]:
    prompts = [local_module._prompt_ids(tokenizer, row, "json_output") for row in rows]
    # budgets from 1 token to longer than most answers, so rows end by their EOS and by their budget
    budgets = [1 + (7 * i) % 24 for i in range(len(rows))]
    return prompts, budgets


@pytest.mark.slow
def test_every_row_is_answered_as_generate_answers_it_alone_at_any_batch_size(json_model):
    model, tokenizer = json_model
    rows = _rows()
    prompts, budgets = _cases(tokenizer, rows)
    assert decoding.supports(model, prompts, tokenizer.eos_token_id)
    expected = [_alone(model, tokenizer, p, b) for p, b in zip(prompts, budgets)]
    ended = [tokens[-1] == tokenizer.eos_token_id and len(tokens) < budget for tokens, budget in zip(expected, budgets)]
    assert any(ended) and not all(ended)  # some rows stop early by their EOS, others run to their budget
    assert len({len(p) for p in prompts}) > 5  # prompts of many lengths
    for slots in (1, 3, len(rows)):
        answers = {}
        for done in decoding.greedy_answers(model, prompts, budgets, eos=tokenizer.eos_token_id, slots=slots,
                                            clock=time.perf_counter):
            for answer in done:
                assert answer.index not in answers and answer.started <= answer.done
                answers[answer.index] = answer.tokens
        assert [answers[i] for i in range(len(rows))] == expected, slots


def test_a_row_leaves_the_batch_when_its_answer_is_final(json_model):
    """Rows are yielded at the step that completed them: a row with a budget of 1 comes back from its prefill,
    before the rows with longer answers, and nothing is decoded past a row's EOS or budget."""
    model, tokenizer = json_model
    rows = _rows()[:6]
    prompts, _ = _cases(tokenizer, rows)
    budgets = [1, 30, 30, 2, 30, 30]
    order = [answer.index for done in decoding.greedy_answers(model, prompts, budgets, eos=tokenizer.eos_token_id,
                                                              slots=6, clock=time.perf_counter) for answer in done]
    assert order[0] == 0 and order.index(3) < order.index(1)


@pytest.mark.slow
def test_results_through_the_runner_equal_generate_alone(json_model):
    """The runner's results (output text, token counts) are those of each row alone, for every batch size."""
    model, tokenizer = json_model
    rows = _rows()[::2]
    prompts = [local_module._prompt_ids(tokenizer, row, "json_output") for row in rows]
    budgets = [min(24, 2 * len(tokenizer(r.expected, add_special_tokens=False)["input_ids"]) + 8) for r in rows]
    alone = [_alone(model, tokenizer, p, b) for p, b in zip(prompts, budgets)]
    expected = {row.id: (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), len(prompt))
                for row, tokens, prompt in zip(rows, alone, prompts)}
    for batch_size in (1, 32):
        results = [r for batch in local_module._answer_rows(model, tokenizer, "json_output", "h", rows, batch_size, 24)
                   for r in batch]
        assert {r.row_id: (r.output, r.completion_tokens, r.prompt_tokens) for r in results} == expected


def test_a_model_with_a_logits_processor_is_run_through_generate(tmp_path):
    """A generation config that asks for a processor (here a repetition penalty) is not reproduced by the
    decoding loop: such a model goes through `model.generate`, and still answers as it does alone."""
    folder = tmp_path / "penalised"
    shutil.copytree(DEMO / "models" / "json_output", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5}))
    model, tokenizer = local_module.load_model(ModelRef("penalised", folder), "cpu")
    rows = _rows()[:4]
    prompts = [local_module._prompt_ids(tokenizer, row, "penalised") for row in rows]
    assert not decoding.supports(model, prompts, tokenizer.eos_token_id)
    results = [r for batch in local_module._answer_rows(model, tokenizer, "penalised", "h", rows, 1, 16)
               for r in batch]
    budgets = [min(16, 2 * len(tokenizer(r.expected, add_special_tokens=False)["input_ids"]) + 8) for r in rows]
    assert {r.row_id: r.output for r in results} == {
        row.id: tokenizer.decode(_alone(model, tokenizer, p, b), skip_special_tokens=True)
        for row, p, b in zip(rows, prompts, budgets)}
