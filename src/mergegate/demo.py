"""`mergegate demo`: generated sample checkpoints merged with several methods, each result loaded and run.

The sample models are random (base + small deltas), so what this shows is the machinery — recipes,
compatibility checks, streaming, provenance, loadable output — and how far each merge lands from its
sources. Per-cohort evaluation of trained demo models replaces it when the evaluation stage lands.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from .engine import merge
from .samples import write_family

RECIPES = {
    "linear": {"models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ft1", "ft2", "ft3")]},
    "task_arithmetic": {"base_model": "base", "parameters": {"lambda": 0.7},
                        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ft1", "ft2", "ft3")]},
    "ties": {"base_model": "base", "parameters": {"density": 0.5},
             "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ft1", "ft2", "ft3")]},
    "dare_ties": {"base_model": "base", "parameters": {"density": 0.5},
                  "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ft1", "ft2", "ft3")]},
    "breadcrumbs": {"base_model": "base", "parameters": {"density": 0.9, "gamma": 0.01},
                    "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("ft1", "ft2", "ft3")]},
    "slerp": {"base_model": "base", "parameters": {"t": [0.2, 0.8]}, "models": [{"model": "ft1"}]},
}


def _relative_distance(a: Path, b: Path) -> float:
    from .checkpoint import Checkpoint

    left, right = Checkpoint(a), Checkpoint(b)
    num = den = 0.0
    for name in left.tensors:
        x, y = left.read(name).double(), right.read(name).double()
        num += float((x - y).pow(2).sum())
        den += float(x.pow(2).sum())
    return (num / den) ** 0.5


def run_demo(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console()
    out = Path(out)
    samples = out / "samples"
    if not (samples / "ft3" / "config.json").exists():
        console.print(f"generating sample checkpoints in {samples} …")
        write_family(samples, finetunes=3)
    table = Table(title="mergegate demo: sample checkpoints merged, loaded with transformers, generated from")
    for column in ("method", "seconds", "MB", "dist→base", "dist→ft1", "dist→ft2", "loads+generates"):
        table.add_column(column, justify="right" if column != "method" else "left")
    tokenizer = AutoTokenizer.from_pretrained(samples / "base")
    prompt = tokenizer("hello", return_tensors="pt")
    for method, body in RECIPES.items():
        recipe_path = out / "recipes" / f"{method}.yaml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe = {"merge_method": method, **body, "dtype": "float32"}
        recipe["models"] = [{**m, "model": str(samples / m["model"])} for m in recipe["models"]]
        if "base_model" in recipe:
            recipe["base_model"] = str(samples / recipe["base_model"])
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        target = out / "merged" / method
        started = time.perf_counter()
        result = merge(recipe_path, target, overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(target)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=3)
        ok = generated.shape[1] == prompt["input_ids"].shape[1] + 8
        table.add_row(method, f"{seconds:.2f}", f"{result.bytes_written / 1e6:.2f}",
                      *(f"{_relative_distance(samples / s, target):.4f}" for s in ("base", "ft1", "ft2")),
                      "yes" if ok else "NO")
    console.print(table)
    console.print(f"recipes in {out / 'recipes'}, merged models (with mergegate.json provenance) in {out / 'merged'}")
