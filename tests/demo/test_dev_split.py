"""The demo's dev split (examples/demo/dev.jsonl, issue 12): suite-format rows for choosing merges that share no
prompt with the held-out suite or with any prompt the shipped models were trained on, rebuilt byte for byte by
`build.py --dev-only`."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mergegate.evaluate.suite import load_suite

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def _load_build():
    threads = torch.get_num_threads()  # build.py sets two torch threads on import; keep the session's setting
    spec = importlib.util.spec_from_file_location("demo_build", DEMO / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    torch.set_num_threads(threads)
    return module


build = _load_build()


def test_dev_split_loads_and_shares_no_prompt_or_id_with_the_suite():
    dev, suite = load_suite(DEMO / "dev.jsonl"), load_suite(DEMO / "suite.jsonl")
    assert dev.cohorts == suite.cohorts
    assert {row.prompt for row in dev.rows}.isdisjoint(row.prompt for row in suite.rows)
    assert {row.id for row in dev.rows}.isdisjoint(row.id for row in suite.rows)
    assert all(row.id.startswith("dev-") for row in dev.rows)
    counts = Counter(row.cohort for row in dev.rows)
    # arithmetic: only 11 two-digit sums are in neither training nor the suite (README.md, "Dev split")
    assert counts == {"arithmetic": 11, "tool_required": 40, "json_output": 40, "policy_refusal": 40,
                      "out_of_domain": 40}
    refusals = [row for row in dev.rows if row.cohort == "policy_refusal" and row.expected == build.REFUSAL]
    assert len(refusals) == 28  # the suite's 70% must-refuse share


@pytest.mark.slow  # replays 5,200 training steps of sampling, ~5 s
def test_dev_split_is_rebuilt_byte_for_byte_and_has_no_training_prompt(tmp_path):
    suite_prompts = {row["prompt"] for row in build.build_suite()}
    trained = build.replay_training_prompts(suite_prompts)
    # distinct prompts per run and generator, as measured when dev.jsonl was built (README.md, "Dev split");
    # the policy_refusal specialist alone saw 278 of the 378 refusal prompts, the suite holds the other 100
    distinct = {run: {name: len(prompts) for name, prompts in by_name.items()} for run, by_name in trained.items()}
    assert distinct["base"] == {"arithmetic": 9366, "tool_required": 25546, "json_output": 20871,
                                "policy_refusal": 262, "out_of_domain": 19284, "generic": 1}
    assert distinct["policy_refusal"]["policy_refusal"] == 278
    assert distinct["arithmetic_lora"]["arithmetic"] == 9683
    every_trained = set().union(*(p for by_name in trained.values() for p in by_name.values()))
    assert every_trained.isdisjoint(suite_prompts)
    dev_prompts = {json.loads(line)["prompt"] for line in (DEMO / "dev.jsonl").read_text().splitlines()}
    assert dev_prompts.isdisjoint(every_trained)

    rebuilt = tmp_path / "dev.jsonl"
    build.write_jsonl(build.build_dev(suite_prompts | every_trained), rebuilt)
    assert rebuilt.read_bytes() == (DEMO / "dev.jsonl").read_bytes()
