"""Benchmark: mergegate vs mergekit on the same recipes and the same generated Llama checkpoints.

What it measures, per merge method (linear, task_arithmetic, ties, dare_ties, della, slerp; all `dtype: bfloat16`):

* wall time of the whole CLI process (`mergekit-yaml RECIPE OUT` and `mergegate merge RECIPE OUT --overwrite -q`),
  start-up and imports included;
* peak RSS of exactly that child process (`ru_maxrss` from `os.wait4`);
* agreement of the two outputs, read one tensor at a time: max |mergekit - mergegate| over all tensors
  (in float32), the same difference relative to the max |value| of the mergekit tensor, and the share of
  elements that are not equal. Methods with discrete choices (TIES: magnitude trim, sign election) can
  flip single elements where mergekit's bfloat16 arithmetic and mergegate's float32 arithmetic (or their
  tie-breaking between equal magnitudes) decide differently, so their max difference is of the size of a
  delta, not of a rounding step.

It also times `mergegate --help` and `mergekit-yaml --help` (CLI start-up), and prints where mergegate's time
goes per method (one more in-process merge, `MergeResult.phases`): planning (opening models, lineage check),
then read, compute, hash and write as seconds summed over the threads doing them, then finishing (fsync,
side files, provenance). DARE and DELLA draw random masks: their outputs cannot agree with mergekit's.

`--scaling` runs only mergegate, each method with its CPU affinity narrowed to 1, 2, 4, … of the cores this
process may use (so `--workers` and the span pool both default to that many), and prints wall time per core
count. Where torch sees a CUDA GPU, each method also runs with `--device cuda` beside the CPU.

Inputs are a base and three fine-tunes (base + 0.002 · seeded noise) of a random Llama written straight to
safetensors — no transformers model is instantiated — under `--work` (default `bench-out/`), and reused when
`config.json` says they already have the requested sizes. The page cache is warmed by reading every input
once before timing. Each method runs both tools `--repeats` times, alternating which goes first; the table
shows the median wall time and the largest peak RSS. Results go to stdout and to `results.json` and
`results.md` in the work folder.

    .venv/bin/python benchmarks/merge_vs_mergekit.py --small          # quick: hidden 256, 2 layers
    .venv/bin/python benchmarks/merge_vs_mergekit.py                  # ≈333M params, ≈667 MB per model
    .venv/bin/python benchmarks/merge_vs_mergekit.py --methods ties slerp --repeats 3
    .venv/bin/python benchmarks/merge_vs_mergekit.py --scaling --methods linear ties

mergekit runs from its own virtual environment, `<work>/mergekit-venv`, created on first use (torch==2.13.0
first, then mergekit==0.1.5 from PyPI); `--mergekit-bin` points at another installation instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
FINETUNES = ("ft1", "ft2", "ft3")
SMALL = {"hidden": 256, "layers": 2, "intermediate": 688, "vocab": 2000}
MERGEKIT_PACKAGES = (["torch==2.13.0"], ["mergekit==0.1.5"])  # torch first: the CPU build, not a CUDA one
WEIGHTED = [{"model": name, "parameters": {"weight": 1.0}} for name in FINETUNES]
RECIPES = {
    "linear": {"models": WEIGHTED},
    "task_arithmetic": {"base_model": "base", "parameters": {"lambda": 0.7}, "models": WEIGHTED},
    "ties": {"base_model": "base", "parameters": {"density": 0.5}, "models": WEIGHTED},
    "dare_ties": {"base_model": "base", "parameters": {"density": 0.5}, "models": WEIGHTED},
    "della": {"base_model": "base", "parameters": {"density": 0.5, "epsilon": 0.1}, "models": WEIGHTED},
    "slerp": {"base_model": "base", "parameters": {"t": 0.5}, "models": [{"model": "base"}, {"model": "ft1"}]},
}


# --- inputs -------------------------------------------------------------------------------------------------


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, tie_word_embeddings=False, dtype=args.dtype,
                       architectures=["LlamaForCausalLM"])


def llama_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an untied LlamaForCausalLM."""
    h, m = args.hidden, args.intermediate
    shapes = {"model.embed_tokens.weight": (args.vocab, h)}
    for i in range(args.layers):
        layer = f"model.layers.{i}"
        shapes.update({f"{layer}.self_attn.{p}_proj.weight": (h, h) for p in "qkvo"})
        shapes.update({f"{layer}.mlp.gate_proj.weight": (m, h), f"{layer}.mlp.up_proj.weight": (m, h),
                       f"{layer}.mlp.down_proj.weight": (h, m)})
        shapes.update({f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)})
    return shapes


def is_current(folder: Path, config) -> bool:
    """True when `folder` holds a finished checkpoint with these sizes (config.json is written last)."""
    keys = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "dtype")
    path = folder / "config.json"
    if not path.exists() or not (folder / "model.safetensors").exists():
        return False
    found, wanted = json.loads(path.read_text()), config.to_dict()
    return all(found.get(key) == wanted.get(key) for key in keys)


def write_checkpoint(folder: Path, config, tensors: dict[str, torch.Tensor]) -> None:
    from mergegate.demo.samples import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").unlink(missing_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(folder)
    config.save_pretrained(folder)


def base_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.ones(shape, dtype=dtype) if len(shape) == 1
            else (0.02 * torch.randn(shape, generator=generator)).to(dtype)
            for name, shape in shapes.items()}


def finetune_tensors(base: Path, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(base / "model.safetensors", framework="pt") as fh:
        for name in fh.keys():
            tensor = fh.get_tensor(name).float()
            tensors[name] = (tensor + 0.002 * torch.randn(tensor.shape, generator=generator)).to(dtype)
    return tensors


def prepare_inputs(args: argparse.Namespace) -> Path:
    """Write (or reuse) base, ft1..ft3 under WORK/models; returns that folder."""
    root, config, dtype = args.work / "models", llama_config(args), getattr(torch, args.dtype)
    for index, name in enumerate(("base",) + FINETUNES):
        folder = root / name
        if is_current(folder, config):
            continue
        print(f"generating {folder} …", flush=True)
        tensors = (base_tensors(llama_shapes(args), dtype, args.seed) if name == "base"
                   else finetune_tensors(root / "base", dtype, args.seed * 1000 + index))
        write_checkpoint(folder, config, tensors)
        del tensors
    return root


def warm_page_cache(root: Path) -> None:
    for file in sorted(root.rglob("*.safetensors")):
        with open(file, "rb") as fh:
            while fh.read(1 << 24):
                pass


def write_recipes(args: argparse.Namespace, models: Path) -> dict[str, Path]:
    folder, paths = args.work / "recipes", {}
    folder.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        body = RECIPES[method]
        recipe = {"merge_method": method, **body, "dtype": "bfloat16"}
        recipe["models"] = [{**entry, "model": str(models / entry["model"])} for entry in body["models"]]
        if "base_model" in body:
            recipe["base_model"] = str(models / body["base_model"])
        paths[method] = folder / f"{method}.yaml"
        paths[method].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return paths


# --- running ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss_kb: int


def run_measured(command: list[str], log: Path, cpus: list[int] | None = None) -> Run:
    """Run `command` to completion (on `cpus` only, when given); wall time and the child's own peak RSS.
    Raises with the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    narrow = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(log, "wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=narrow)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {child.returncode}; output ({log}):\n{log.read_text()}")
    return Run(seconds, usage.ru_maxrss)


def merge_commands(args: argparse.Namespace, recipe: Path, out: Path) -> dict[str, list[str]]:
    return {"mergekit": [str(args.mergekit_bin), str(recipe), str(out / "mergekit")],
            "mergegate": [str(args.mergegate_bin), "merge", str(recipe), str(out / "mergegate"), "--overwrite", "-q"]}


def bench_method(args: argparse.Namespace, method: str, recipe: Path) -> dict[str, list[Run]]:
    """Both tools `args.repeats` times, alternating which goes first."""
    out, runs = args.work / "out" / method, {"mergekit": [], "mergegate": []}
    commands = merge_commands(args, recipe, out)
    for repeat in range(args.repeats):
        order = ["mergekit", "mergegate"] if repeat % 2 == 0 else ["mergegate", "mergekit"]
        for tool in order:
            if tool == "mergekit":  # mergekit has no --overwrite
                shutil.rmtree(out / "mergekit", ignore_errors=True)
            print(f"  {method}: {tool} (repeat {repeat + 1}/{args.repeats}) …", flush=True)
            runs[tool].append(run_measured(commands[tool], args.work / "logs" / f"{method}-{tool}-{repeat}.log"))
            print(f"    {runs[tool][-1].seconds:.1f} s, peak RSS {gb(runs[tool][-1].peak_rss_kb):.2f} GB", flush=True)
    return runs


PHASES_SCRIPT = """
import json, sys
from mergegate import merge
result = merge(sys.argv[1], sys.argv[2], overwrite=True, progress=False, **json.loads(sys.argv[3]))
print(json.dumps({"seconds": result.seconds, **result.phases}))
"""
PHASE_COLUMNS = ("plan", "read", "compute", "hash", "write", "finish")


def mergegate_phases(args: argparse.Namespace, recipe: Path, out: Path, **options) -> dict[str, float]:
    """One in-process merge's time breakdown (MergeResult.phases), in a child process like the timed runs."""
    python = args.mergegate_bin.parent / "python"
    done = subprocess.run([str(python), "-c", PHASES_SCRIPT, str(recipe), str(out), json.dumps(options)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def core_counts(available: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 < available:
        counts.append(counts[-1] * 2)
    return counts + ([available] if available > 1 else [])


def run_scaling(args: argparse.Namespace, recipes: dict[str, Path]) -> str:
    """mergegate's wall time per method with its affinity narrowed to 1, 2, 4, … cores (and on CUDA if present)."""
    cores = sorted(os.sched_getaffinity(0))
    counts = core_counts(len(cores))
    cuda = torch.cuda.is_available()
    lines = ["| method | " + " | ".join(f"{n} cores s" for n in counts) + (" | CUDA s |" if cuda else " |"),
             "|---|" + "--:|" * (len(counts) + cuda)]
    for method, recipe in recipes.items():
        out, row = args.work / "out" / method / "mergegate-scaling", []
        for n in counts:
            command = merge_commands(args, recipe, out.parent)["mergegate"]
            command[3] = str(out)
            print(f"  {method}: mergegate on {n} cores …", flush=True)
            row.append(statistics.median(run_measured(command, args.work / "logs" / f"{method}-scaling-{n}.log",
                                                      cpus=cores[:n]).seconds for _ in range(args.repeats)))
        if cuda:
            command = merge_commands(args, recipe, out.parent)["mergegate"] + ["--device", "cuda"]
            command[3] = str(out)
            row.append(run_measured(command, args.work / "logs" / f"{method}-cuda.log").seconds)
        lines.append(f"| {method} | " + " | ".join(f"{seconds:.1f}" for seconds in row) + " |")
    return "\n".join(lines) + "\n"


def startup_seconds(args: argparse.Namespace) -> dict[str, float]:
    commands = {"mergekit": [str(args.mergekit_bin), "--help"], "mergegate": [str(args.mergegate_bin), "--help"]}
    return {tool: statistics.median(run_measured(command, args.work / "logs" / f"startup-{tool}.log").seconds
                                    for _ in range(args.repeats))
            for tool, command in commands.items()}


# --- comparing ----------------------------------------------------------------------------------------------


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a single file or any sharding."""
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as fh:
            files.update({name: path for name in fh.keys()})
    return files


def read_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as fh:
        return fh.get_tensor(name).float()


def compare_outputs(reference: Path, candidate: Path, worst: int = 3) -> dict:
    """Max abs and relative difference, share of unequal elements, the worst tensors; one tensor pair at a time."""
    left, right = tensor_files(reference), tensor_files(candidate)
    per_tensor, unequal, total = [], 0, 0
    for name in sorted(left.keys() & right.keys()):
        a, b = read_tensor(left[name], name), read_tensor(right[name], name)
        if a.shape != b.shape:
            raise RuntimeError(f"{name}: shape {tuple(a.shape)} in {reference} but {tuple(b.shape)} in {candidate}")
        diff = float((a - b).abs().max())
        per_tensor.append((diff / max(float(a.abs().max()), 1e-30), diff, name))
        unequal, total = unequal + int(torch.count_nonzero(a != b)), total + a.numel()
    per_tensor.sort(reverse=True)
    return {"max_abs_diff": max(d for _, d, _ in per_tensor), "max_rel_diff": per_tensor[0][0],
            "unequal_pct": 100 * unequal / total,
            "worst_tensors": [{"name": n, "abs": d, "rel": r} for r, d, n in per_tensor[:worst]],
            "only_in_mergekit": sorted(left.keys() - right.keys()),
            "only_in_mergegate": sorted(right.keys() - left.keys())}


# --- reporting ----------------------------------------------------------------------------------------------


def gb(kilobytes: int) -> float:
    return kilobytes * 1024 / 1e9


def summarize(method: str, runs: dict[str, list[Run]], agreement: dict, phases: dict[str, float]) -> dict:
    seconds = {tool: statistics.median(r.seconds for r in rs) for tool, rs in runs.items()}
    rss = {tool: gb(max(r.peak_rss_kb for r in rs)) for tool, rs in runs.items()}
    return {"method": method, "mergekit_s": seconds["mergekit"], "mergegate_s": seconds["mergegate"],
            "time_ratio": seconds["mergegate"] / seconds["mergekit"],
            "mergekit_rss_gb": rss["mergekit"], "mergegate_rss_gb": rss["mergegate"],
            "rss_ratio": rss["mergegate"] / rss["mergekit"], **agreement, "phases": phases,
            "runs": {tool: [asdict(r) for r in rs] for tool, rs in runs.items()}}


def markdown(rows: list[dict], startup: dict[str, float], header: str) -> str:
    lines = [header, "",
             "| method | mergekit s | mergegate s | time ratio | mergekit peak RSS GB | mergegate peak RSS GB "
             "| RSS ratio | max abs diff | max rel diff | elements differing |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['method']} | {r['mergekit_s']:.1f} | {r['mergegate_s']:.1f} | {r['time_ratio']:.2f} "
              f"| {r['mergekit_rss_gb']:.2f} | {r['mergegate_rss_gb']:.2f} | {r['rss_ratio']:.2f} "
              f"| {r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} | {r['unequal_pct']:.3f}% |" for r in rows]
    lines += ["", f"CLI start-up (`--help`): mergekit-yaml {startup['mergekit']:.2f} s, "
              f"mergegate {startup['mergegate']:.2f} s, ratio {startup['mergegate'] / startup['mergekit']:.2f}"]
    lines += ["", "Where mergegate's time goes (one in-process merge; plan and finish are wall seconds, read, compute, "
              "hash and write seconds summed over the threads):", "",
              "| method | merge s | " + " | ".join(PHASE_COLUMNS) + " |", "|---|--:|" + "--:|" * len(PHASE_COLUMNS)]
    lines += [f"| {r['method']} | {r['phases']['seconds'] + r['phases'].get('plan', 0):.2f} | "
              + " | ".join(f"{r['phases'].get(column, 0):.2f}" for column in PHASE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def describe_run(args: argparse.Namespace) -> str:
    params = sum(torch.Size(shape).numel() for shape in llama_shapes(args).values())
    return (f"Llama {params / 1e6:.0f}M params (hidden {args.hidden}, layers {args.layers}, intermediate "
            f"{args.intermediate}, vocab {args.vocab}), {args.dtype}, repeats {args.repeats}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench-out", help="Folder for models, merges, results.")
    parser.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of the generated checkpoints (the recipes always merge in bfloat16).")
    parser.add_argument("--small", action="store_true",
                        help="Quick run: " + ", ".join(f"{key} {value}" for key, value in SMALL.items()))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scaling", action="store_true",
                        help="Only mergegate, at 1, 2, 4, … cores (CPU affinity) and on CUDA where present.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mergegate-bin", type=Path, default=Path(sys.executable).parent / "mergegate")
    parser.add_argument("--mergekit-bin", type=Path, default=None,
                        help="mergekit-yaml to use (default: <work>/mergekit-venv, created when missing).")
    args = parser.parse_args(argv)
    if args.small:
        vars(args).update(SMALL)
    return args


def install_mergekit(work: Path) -> Path:
    """mergekit in the benchmark's own virtual environment, so its dependencies never touch mergegate's."""
    venv = work / "mergekit-venv"
    binary = venv / "bin" / "mergekit-yaml"
    if not binary.exists():
        print(f"installing mergekit 0.1.5 into {venv} …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in MERGEKIT_PACKAGES:
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True)
    return binary


def check_binaries(args: argparse.Namespace) -> None:
    if args.mergekit_bin is None:
        args.mergekit_bin = install_mergekit(args.work)
    if not args.mergekit_bin.exists():
        sys.exit(f"mergekit not found at {args.mergekit_bin}")
    if not args.mergegate_bin.exists():
        sys.exit(f"mergegate not found at {args.mergegate_bin}; pass --mergegate-bin (e.g. .venv/bin/mergegate)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.scaling:
        args.mergekit_bin = args.mergekit_bin or Path("/bin/true")  # not run
    check_binaries(args)
    models = prepare_inputs(args)
    recipes = write_recipes(args, models)
    warm_page_cache(models)
    header = describe_run(args)
    print(header, flush=True)
    if args.scaling:
        table = f"{header}\n\nmergegate wall time by cores given (CPU affinity):\n\n" + run_scaling(args, recipes)
        print("\n" + table)
        (args.work / "scaling.md").write_text(table)
        return
    startup = startup_seconds(args)
    rows = []
    for method, recipe in recipes.items():
        runs = bench_method(args, method, recipe)
        out = args.work / "out" / method
        agreement = compare_outputs(out / "mergekit", out / "mergegate")
        phases = mergegate_phases(args, recipe, out / "mergegate")
        rows.append(summarize(method, runs, agreement, phases))
    table = markdown(rows, startup, header)
    print("\n" + table)
    (args.work / "results.md").write_text(table)
    (args.work / "results.json").write_text(json.dumps({"setup": header, "startup_s": startup, "methods": rows},
                                                       indent=2))


if __name__ == "__main__":
    main()
