"""Serving cost of three ways to serve N LoRA specialists: one merge, the base with N adapters on it (shared, PEFT
multi-adapter, the request's adapter set per request), N full models (each `base+adapter` folded), plus the learned
router among the adapters when one is given. Per plan: bytes of parameters held by the loaded modules (each storage
once) and per-request latency (batch 1, greedy, exactly --tokens new tokens, so every plan does the same work),
over --rows prompts of each adapter's cohort from the suite, each request served as that plan serves its cohort.

    .venv/bin/python benchmarks/adapters_serving.py --base examples/smollm2/base \
        --adapter arithmetic=examples/smollm2/adapters/arithmetic ... --merge merged/ties \
        --suite examples/smollm2/suite.jsonl [--router compare-out/router]

Prints a Markdown table (benchmarks/README.md has the measured one)."""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path

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


def _timed(model, tokenizer, prompts: list[tuple[str, list[int]]], tokens: int, serve) -> list[float]:
    """ms per request: `serve(model, cohort, ids)` sets up the request (its adapter), then generation."""
    times = []
    for cohort, ids in prompts:
        started = time.perf_counter()
        with serve(cohort, ids):
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        times.append((time.perf_counter() - started) * 1000)
    return times


def _row(plan: str, holds: str, size: int, times: list[float]) -> str:
    p99 = statistics.quantiles(times, n=100)[98] if len(times) > 1 else times[0]
    return f"| {plan} | {holds} | {size / 2**20:,.1f} MiB | {statistics.median(times):.1f} | {p99:.1f} |"


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
    table = ["| plan | holds | parameters held | p50 ms / request | p99 ms / request |", "|---|---|---|---|---|"]

    shared, tokenizer = load_shared(args.base, adapters)
    prompts = [(row.cohort, _prompt_ids(tokenizer, row, "bench")) for row in rows]
    size = held_parameter_bytes(shared)
    _timed(shared, tokenizer, prompts[:1], 2, lambda cohort, ids: use_adapter(shared, cohort))  # warm-up
    times = _timed(shared, tokenizer, prompts, args.tokens, lambda cohort, ids: use_adapter(shared, cohort))
    count = f"{len(adapters)} adapter{'s' if len(adapters) != 1 else ''}"
    table.append(_row("adapters on a shared base", f"1 base + {count}", size, times))
    if args.router is not None:
        router = AdapterRouter.load(args.router)

        def routed(cohort, ids):
            picked = router.pick(prompt_features(shared, [ids], tokenizer.pad_token_id))[0]
            return use_adapter(shared, picked)

        extra = sum(t.numel() * t.element_size() for t in (router.weight, router.bias, router.mean, router.scale))
        times = _timed(shared, tokenizer, prompts, args.tokens, routed)
        table.append(_row("learned router among the adapters", f"1 base + {count} + router",
                          size + extra, times))
    shared = None  # freed before the next plan loads
    gc.collect()

    if args.merge is not None:
        merged, _ = load_model(ModelRef("merge", args.merge), "cpu")
        _timed(merged, tokenizer, prompts[:1], 2, lambda cohort, ids: nullcontext())
        times = _timed(merged, tokenizer, prompts, args.tokens, lambda cohort, ids: nullcontext())
        table.append(_row("one merge", "1 model", held_parameter_bytes(merged), times))
        del merged
        gc.collect()

    full_size, times = 0, []
    for cohort, path in adapters.items():  # one full model at a time: its own requests, then freed
        model, _ = load_model(ModelRef(cohort, args.base, adapter=path), "cpu")
        full_size += held_parameter_bytes(model)
        mine = [p for p in prompts if p[0] == cohort]
        _timed(model, tokenizer, mine[:1], 2, lambda c, ids: nullcontext())
        times += _timed(model, tokenizer, mine, args.tokens, lambda c, ids: nullcontext())
        del model
        gc.collect()
    table.append(_row("separate full models", f"{len(adapters)} model{'s' if len(adapters) != 1 else ''}",
                      full_size, times))
    print(f"{len(prompts)} requests ({args.rows} per cohort), batch 1, {args.tokens} new tokens each, "
          f"{args.threads} torch thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("\n".join(table))


if __name__ == "__main__":
    main()
