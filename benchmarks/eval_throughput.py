#!/usr/bin/env python
"""Evaluation throughput: mergegate's runners against the plain `transformers` loops people write.

    .venv/bin/python benchmarks/eval_throughput.py                       # defaults: ~2-3 min on 2 cores
    .venv/bin/python benchmarks/eval_throughput.py --rows 200 --batch-size 16 --concurrency 1,8,32

Part 1, in process (same model, same rows, float32 on the CPU, greedy, same max_new_tokens, same torch threads;
model loading is timed in every variant):
  mergegate           `evaluate_models` (length-bucketed batches, each row cut at its own token budget, scores,
                      registry writes) on a fresh temporary registry with force=True: nothing comes from a cache
  plain, batch 1      `model.generate` row by row, decoded: the naive loop
  plain, batched      left-padded batches of --batch-size in suite order, no bucketing, no per-row budgets
The ratio is mergegate rows/s over the plain variant's; the issue's target is >= 1.5x the plain loop.

Part 2, the endpoint runner (`evaluate_models` on a url model, fresh registry, force=True) at each
--concurrency against loopback servers on 127.0.0.1:
  gateway             the same demo model served by the project's gateway (create_app, a one-model RolloutPlan,
                      in a ServerThread in this process; a local model answers one request at a time)
  stub                gateway/testing.py's StubUpstream: answers at once, so this is the runner's own overhead
Both servers run in this process (a uvicorn thread), so client and server share one interpreter and its GIL.
Neither server has /tokenize, so every row is sent with max_tokens = --max-new-tokens (the runner's fallback).
The ratio there is rows/s over the same server's concurrency-1 figure.

Rows: the first --rows rows of the demo suite taken round-robin over its cohorts, leaving out `perplexity`
rows (a completions endpoint cannot score them, and the plain loops compute no likelihoods).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"


def pick_rows(suite, n: int):
    from mergegate.evaluate.suite import Suite

    cohorts: dict[str, list] = {}
    for row in suite.rows:
        if "perplexity" not in row.evaluators:
            cohorts.setdefault(row.cohort, []).append(row)
    rows = []
    for i in range(max(len(v) for v in cohorts.values())):
        rows += [v[i] for v in cohorts.values() if i < len(v)]
    rows = rows[:n]
    digest = hashlib.sha256("\n".join(r.model_dump_json() for r in rows).encode()).hexdigest()
    return Suite(None, tuple(rows), digest)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_mergegate(ref, suite, args, work: Path) -> float:
    from mergegate.evaluate import EvalOptions, evaluate_models
    from mergegate.registry import Registry

    registry = Registry(Path(tempfile.mkdtemp(dir=work)) / "registry.sqlite")
    options = EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False, force=True,
                          threads=args.threads, device="cpu")
    return timed(lambda: evaluate_models([(ref, "candidate")], suite, registry, options))


def load_plain(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@torch.no_grad()
def run_plain(path: Path, suite, args, batch_size: int) -> float:
    def go():
        model, tokenizer = load_plain(path)
        rows = list(suite.rows)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            encoded = tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    return timed(go)


def run_endpoint(url: str, served: str, suite, args, concurrency: int, work: Path) -> float:
    from mergegate.evaluate import EvalOptions, evaluate_models
    from mergegate.model_ref import EndpointSettings, ModelRef
    from mergegate.registry import Registry

    ref = ModelRef(served, url=url)
    registry = Registry(Path(tempfile.mkdtemp(dir=work)) / "registry.sqlite")
    settings = EndpointSettings(concurrency=concurrency, timeout_s=300.0, retries=0)
    options = EvalOptions(max_new_tokens=args.max_new_tokens, progress=False, force=True, threads=args.threads,
                          endpoint=settings)
    return timed(lambda: evaluate_models([(ref, "candidate")], suite, registry, options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200, help="rows for part 1 (at most 400)")
    parser.add_argument("--endpoint-rows", type=int, default=60, help="rows per gateway run in part 2")
    parser.add_argument("--stub-rows", type=int, default=200, help="rows per stub run in part 2 (at most 400)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=str, default="1,8,32", help="comma-separated list")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores, >= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--model", type=Path, default=DEMO / "models" / "json_output")
    parser.add_argument("--skip-endpoint", action="store_true")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)

    import warnings

    from transformers.utils import logging as hf_logging

    from mergegate.evaluate.suite import load_suite
    from mergegate.model_ref import ModelRef

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*sent no usage.*")
    full = load_suite(DEMO / "suite.jsonl")
    suite = pick_rows(full, args.rows)
    name = args.model.name
    ref = ModelRef(name, args.model)
    work = Path(tempfile.mkdtemp(prefix="eval-throughput-"))

    # warm-up: imports, first-call allocations (not timed)
    run_plain(args.model, pick_rows(full, 2), args, 2)
    run_mergegate(ref, pick_rows(full, 2), args, work)

    variants = [("mergegate evaluate_models", lambda: run_mergegate(ref, suite, args, work)),
                ("plain transformers, batch 1", lambda: run_plain(args.model, suite, args, 1)),
                (f"plain transformers, batched {args.batch_size}, padded",
                 lambda: run_plain(args.model, suite, args, args.batch_size))]
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _ in range(args.repeats):  # interleaved, so a change in machine load touches every variant alike
        for label, fn in variants:
            times[label].append(fn())
    part1 = [(label, statistics.median(values)) for label, values in times.items()]
    ours = len(suite.rows) / part1[0][1]

    part2: list[tuple[str, int, int, float]] = []
    if not args.skip_endpoint:
        from mergegate.gateway.app import create_app
        from mergegate.gateway.testing import StubUpstream
        from mergegate.registry import Registry
        from mergegate.rollout import RolloutPlan
        from mergegate.serving.launcher import ServerThread

        plan = RolloutPlan.model_validate({
            "candidate": name, "models": {name: {"role": "candidate", "path": str(args.model)}},
            "routes": {}, "default": {"model": name}})
        app = create_app(plan, registry=Registry(work / "gateway.sqlite"))
        with ServerThread(app) as server:
            rows = pick_rows(full, args.endpoint_rows)
            for c in concurrency:
                part2.append(("gateway (demo model)", c, len(rows.rows), statistics.median(
                    run_endpoint(server.url + "/v1", name, rows, args, c, work) for _ in range(args.repeats))))
        stub = StubUpstream()
        stub.set("bench", reply="stub reply " * 4)
        with ServerThread(stub.app) as server:
            rows = pick_rows(full, args.stub_rows)
            for c in concurrency:
                part2.append(("stub upstream", c, len(rows.rows), statistics.median(
                    run_endpoint(server.url + "/v1", "bench", rows, args, c, work) for _ in range(args.repeats))))

    print(f"\n{os.cpu_count()} cores, load average {load_start:.2f} at start; torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}; model {name}; max_new_tokens {args.max_new_tokens}; "
          f"batch size {args.batch_size}; median of {args.repeats} runs\n")
    print("| in process | rows | seconds | rows/s | mergegate / this |")
    print("|---|--:|--:|--:|--:|")
    for label, seconds in part1:
        rate = len(suite.rows) / seconds
        print(f"| {label} | {len(suite.rows)} | {seconds:.2f} | {rate:.1f} | {ours / rate:.2f}× |")
    naive = len(suite.rows) / part1[1][1]
    batched = len(suite.rows) / part1[2][1]
    print(f"\ntarget ≥ 1.5× the plain loop: {ours / naive:.2f}× batch-1 loop — "
          f"{'met' if ours / naive >= 1.5 else 'NOT met'}; {ours / batched:.2f}× the padded batched loop — "
          f"{'met' if ours / batched >= 1.5 else 'NOT met'}")
    if part2:
        print("\n| endpoint runner → server | concurrency | rows | seconds | rows/s | vs concurrency "
              f"{concurrency[0]} |")
        print("|---|--:|--:|--:|--:|--:|")
        first: dict[str, float] = {}
        for label, c, n, seconds in part2:
            rate = n / seconds
            first.setdefault(label, rate)
            print(f"| {label} | {c} | {n} | {seconds:.2f} | {rate:.1f} | {rate / first[label]:.2f}× |")


if __name__ == "__main__":
    main()
