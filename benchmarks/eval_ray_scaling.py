#!/usr/bin/env python
"""Sharded evaluation on Ray: rows/s in this process against Ray with 1 and 2 workers.

    .venv/bin/python benchmarks/eval_ray_scaling.py                  # defaults: 2 demo models x 100 rows, ~1 min
    .venv/bin/python benchmarks/eval_ray_scaling.py --rows 200 --workers 1,2,4

Every variant is `evaluate_models` on the same models and rows (float32 on the CPU, greedy, the same batch size
and max_new_tokens) with a fresh registry and force=True, so nothing comes from a cache; model loading is timed
in every variant (each Ray shard loads its own model).
  in-process, T threads   no Ray, torch with T intra-op threads (T = 1 is the default on 2 cores)
  Ray, N workers cold     a local Ray with N CPUs just started (`ray.init` timed apart as "Ray start"): the first
                          evaluation also starts the worker processes and imports torch and transformers in them
  Ray, N workers warm     the same Ray again: workers already up
Each Ray shard runs with one torch thread. The ratio is rows/s over in-process with one thread.

Rows: the first --rows rows of the demo suite round-robin over its cohorts, without `perplexity` rows (as
benchmarks/eval_throughput.py picks them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_throughput import pick_rows  # noqa: E402  (the same rows as the throughput benchmark)


def rows_per_second(models, suite, args, work: Path, **options) -> float:
    from mergegate.evaluate import EvalOptions, evaluate_models
    from mergegate.registry import Registry

    registry = Registry(Path(tempfile.mkdtemp(dir=work)) / "registry.sqlite")
    started = time.perf_counter()
    evaluate_models(models, suite, registry, EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                                         progress=False, force=True, device="cpu", **options))
    return len(models) * len(suite.rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--models", default="base,json_output", help="demo models (examples/demo/models/NAME)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to try")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import ray

    from mergegate.evaluate import load_suite
    from mergegate.model_ref import ModelRef

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    suite = pick_rows(load_suite(DEMO / "suite.jsonl"), args.rows)
    models = [(ModelRef(name, DEMO / "models" / name), "source") for name in args.models.split(",")]
    table: list[tuple[str, float]] = []
    starts: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows_per_second(models, suite, args, work, threads=1)  # warm-up: file caches, lazy imports
        for threads in (1, 2):
            table.append((f"in-process, {threads} thread(s)", rows_per_second(models, suite, args, work,
                                                                              threads=threads)))
        for workers in (int(w) for w in args.workers.split(",")):
            started = time.perf_counter()
            address = ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False).address_info["address"]
            starts[workers] = time.perf_counter() - started
            try:
                for state in ("cold", "warm"):
                    table.append((f"Ray, {workers} worker(s), {state}",
                                  rows_per_second(models, suite, args, work, workers=workers, ray_address=address)))
            finally:
                ray.shutdown()
    baseline = table[0][1]
    print(f"{len(models)} models x {len(suite.rows)} rows, batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, {os.cpu_count()} cores")
    print(f"| {'variant':<28} | {'rows/s':>7} | {'vs in-process 1 thread':>22} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 24}|")
    for name, rate in table:
        print(f"| {name:<28} | {rate:>7.1f} | {rate / baseline:>21.2f}x |")
    print("Ray start (ray.init, local): " + ", ".join(f"{w} worker(s) {s:.1f} s" for w, s in starts.items()))


if __name__ == "__main__":
    main()
