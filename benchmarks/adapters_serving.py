"""Serving cost of three ways to serve N LoRA specialists: one merge, the base with N adapters on it (shared, PEFT
multi-adapter, the request's adapter set per request), N full models (each `base+adapter` folded), plus the learned
router among the adapters when one is given. Per plan: bytes of parameters held by the loaded modules (each storage
once) and per-request latency (batch 1, greedy, exactly --tokens new tokens, so every plan does the same work),
over --rows prompts of each adapter's cohort from the suite, each request served as that plan serves its cohort,
by every plan in turn (all plans loaded at once, so they share the machine's load alike).

    .venv/bin/python benchmarks/adapters_serving.py --base examples/smollm2/base \
        --adapter arithmetic=examples/smollm2/adapters/arithmetic ... --merge merged/ties \
        --suite examples/smollm2/suite.jsonl [--router compare-out/router]

Prints a Markdown table (benchmarks/README.md has the measured one)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", action="append", required=True, help="COHORT=PATH (repeat)")
    parser.add_argument("--merge", type=Path, help="a merged model of the same specialists")
    parser.add_argument("--router", type=Path, help="a saved adapter router (mergegate compare --calibration)")
    parser.add_argument("--suite", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8, help="prompts per cohort")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


@dataclass
class Plan:
    """One way of serving: what it holds, its bytes, and `serve(cohort, ids)`: a context in which `model` answers."""

    name: str
    holds: str
    size: int
    model: Callable[[str], Any]  # cohort → the module that generates for it
    serve: Callable[[str, list[int]], Any]
    times: list[float] = field(default_factory=list)


def _generate(model, ids: list[int], tokens: int, pad: int) -> None:
    model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad)


def _row(plan: Plan) -> str:
    times = plan.times
    p99 = statistics.quantiles(times, n=100)[98] if len(times) > 1 else times[0]
    return (f"| {plan.name} | {plan.holds} | {plan.size / 2**20:,.1f} MiB | {statistics.median(times):.1f} | "
            f"{p99:.1f} |")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def main() -> None:
    from contextlib import nullcontext

    from mergegate.evaluate import load_suite
    from mergegate.evaluate.adapter_router import AdapterRouter
    from mergegate.evaluate.adapters import held_parameter_bytes, load_shared, prompt_features, use_adapter
    from mergegate.evaluate.local import _prompt_ids, load_model
    from mergegate.model_ref import ModelRef

    args = _args()
    torch.set_num_threads(args.threads)
    adapters = {text.partition("=")[0]: Path(text.partition("=")[2]) for text in args.adapter}
    suite = load_suite(args.suite)
    rows = [row for cohort in adapters for row in suite.by_cohort(cohort)[:args.rows]]

    shared, tokenizer = load_shared(args.base, adapters)
    shared_size = held_parameter_bytes(shared)
    prompts = [(row.cohort, _prompt_ids(tokenizer, row, "bench")) for row in rows]
    held = f"1 base + {_plural(len(adapters), 'adapter')}"
    plans = [Plan("adapters on a shared base", held, shared_size, lambda cohort: shared,
                  lambda cohort, ids: use_adapter(shared, cohort))]
    if args.router is not None:
        router = AdapterRouter.load(args.router)

        def routed(cohort, ids):
            return use_adapter(shared, router.pick(prompt_features(shared, [ids], tokenizer.pad_token_id))[0])

        extra = sum(t.numel() * t.element_size() for t in (router.weight, router.bias, router.mean, router.scale))
        plans.append(Plan("learned router among the adapters", held + " + router", shared_size + extra,
                          lambda cohort: shared, routed))
    if args.merge is not None:
        merged, _ = load_model(ModelRef("merge", args.merge), "cpu")
        plans.append(Plan("one merge", "1 model", held_parameter_bytes(merged), lambda cohort: merged,
                          lambda cohort, ids: nullcontext()))
    full = {cohort: load_model(ModelRef(cohort, args.base, adapter=path), "cpu")[0] for cohort, path in adapters.items()}
    plans.append(Plan("separate full models", _plural(len(full), "model"), held_parameter_bytes(*full.values()),
                      full.__getitem__, lambda cohort, ids: nullcontext()))

    # Each request served by every plan in turn, the order rotated: the plans share the machine's load alike.
    for plan in plans:  # warm-up
        with plan.serve(prompts[0][0], prompts[0][1]):
            _generate(plan.model(prompts[0][0]), prompts[0][1], 2, tokenizer.pad_token_id)
    for i, (cohort, ids) in enumerate(prompts):
        for plan in plans[i % len(plans):] + plans[:i % len(plans)]:
            started = time.perf_counter()
            with plan.serve(cohort, ids):
                _generate(plan.model(cohort), ids, args.tokens, tokenizer.pad_token_id)
            plan.times.append((time.perf_counter() - started) * 1000)
    print(f"{len(prompts)} requests ({args.rows} per cohort), batch 1, {args.tokens} new tokens each, "
          f"{args.threads} torch thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| plan | holds | parameters held | p50 ms / request | p99 ms / request |")
    print("|---|---|---|---|---|")
    for plan in plans:
        print(_row(plan))


if __name__ == "__main__":
    main()
