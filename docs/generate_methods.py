#!/usr/bin/env python
"""Generate docs/methods.md from real runs: which tool supports which method, what every method does to the
demo's cohorts (`mergegate release`), and how much of each task every method keeps on a real pretrained model
(MiniLM fine-tuned on several classification tasks, docs/experiments/minilm_retention.py).

    .venv/bin/python docs/generate_methods.py                 # runs what is missing, then writes docs/methods.md
    .venv/bin/python docs/generate_methods.py --rerun-demo    # re-run the demo releases (--methods to pick)

Results are kept beside the document (docs/experiments/demo-methods.json, docs/experiments/minilm-out/) so it can
be rewritten without re-running; every figure in methods.md comes from those files.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "examples" / "demo"
MODELS = DEMO / "models"

# Every demo recipe merges the three full specialists and the arithmetic LoRA folded into the base
# (`base+adapter`), so each table row shows what the method keeps of all four skills.
SOURCES = ["tool_required", "json_output", "policy_refusal", "base+arithmetic_lora"]
PAIR = ["tool_required", "json_output"]  # for methods that take exactly two models
DEMO_RECIPES: dict[str, dict] = {
    "linear": {"weights": True},
    # Methods that sum the deltas without normalizing take lambda 0.5, as the demo's own task-arithmetic recipe;
    # ties and della average the agreeing deltas (normalize defaults to true) and keep lambda 1.
    "task_arithmetic": {"weights": True, "parameters": {"lambda": 0.5}},
    "ties": {"weights": True, "parameters": {"density": 0.5}},
    "dare_linear": {"weights": True, "parameters": {"density": 0.5, "lambda": 0.5}},
    "dare_ties": {"weights": True, "parameters": {"density": 0.5, "lambda": 0.5}},
    "breadcrumbs": {"weights": True, "parameters": {"density": 0.9, "gamma": 0.01, "lambda": 0.5}},
    "breadcrumbs_ties": {"weights": True, "parameters": {"density": 0.9, "gamma": 0.01, "lambda": 0.5}},
    "della": {"weights": True, "parameters": {"density": 0.5, "epsilon": 0.15}},
    "della_linear": {"weights": True, "parameters": {"density": 0.5, "epsilon": 0.15, "lambda": 0.5}},
    "sce": {"parameters": {"select_topk": 0.5}},
    "model_stock": {},
    "multislerp": {"weights": True},
    "karcher": {},
    "nuslerp": {"weights": True, "models": PAIR},
    "slerp": {"pair_on_base": True, "parameters": {"t": 0.5}},
    "nearswap": {"pair_on_base": True, "parameters": {"t": 0.5}},
    "arcee_fusion": {"pair_on_base": True},
    "ram": {},
    "ramplus_tl": {},
    # data-aware: each source's statistics from its own skill's text (RegMean's setting), and regmean again with one
    # shared file of every skill plus generic text, to show what the calibration text's coverage does
    "fisher": {"weights": True, "calibration": True},
    "regmean": {"weights": True, "calibration": True},
    "regmean, shared calibration": {"method": "regmean", "weights": True, "calibration": "shared"},
}
NOT_ON_DEMO = {"passthrough": "copies one model (or stacks layer ranges): nothing to compare on the demo"}

PEFT_TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


def _model_ref(name: str) -> str:
    if "+" in name:
        model, adapter = name.split("+")
        return f"{MODELS / model}+{MODELS / adapter}"
    return str(MODELS / name)


def demo_recipe(key: str) -> dict:
    spec = DEMO_RECIPES[key]
    method = spec.get("method", key)
    params = {"weight": 1.0} if spec.get("weights") else None
    if spec.get("pair_on_base"):  # two-model methods interpolate between two specialists
        recipe = {"merge_method": method, "base_model": _model_ref(PAIR[0]),
                  "models": [{"model": _model_ref(PAIR[0])}, {"model": _model_ref(PAIR[1])}]}
    else:
        recipe = {"merge_method": method, "base_model": _model_ref("base"),
                  "models": [{"model": _model_ref(m), **({"parameters": params} if params else {})}
                             for m in spec.get("models", SOURCES)]}
    if spec.get("parameters"):
        recipe["parameters"] = spec["parameters"]
    from mergegate import get_method

    if get_method(method).base == "ignored" and params and not spec.get("pair_on_base"):
        # base_model is an input of every method unless listed (mergekit's rule): weight 0 keeps it out of the
        # average while the release still evaluates it; appended last, where mergekit puts it
        recipe["models"].append({"model": recipe["base_model"], "parameters": {"weight": 0.0}})
    if spec.get("calibration") == "shared":
        recipe["calibration"] = {"path": str(DEMO / "calibration.jsonl"), "max_rows": 80}
    elif spec.get("calibration"):  # each source's statistics from its own skill's text (RegMean's setting)
        skill = {"base+arithmetic_lora": "arithmetic"}
        for entry, name in zip(recipe["models"], spec.get("models", SOURCES)):
            entry["calibration"] = str(DEMO / "calibration" / f"{skill.get(name, name)}.jsonl")
        recipe["calibration"] = {"path": str(DEMO / "calibration.jsonl"), "max_rows": 16}
    recipe["dtype"] = "float32"
    return recipe


def run_demo(out: Path, methods: list[str], rerun: bool) -> dict:
    import yaml

    from mergegate.evaluate import EvalOptions
    from mergegate.pipeline import release
    from mergegate.registry import Registry

    path = HERE / "experiments" / "demo-methods.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # --rerun-demo redoes the listed methods only
    registry = Registry(out / "registry.sqlite")
    for method in methods:
        if method in results and not rerun:
            continue
        recipe = demo_recipe(method)
        slug = method.replace(", ", "-").replace(" ", "-")
        (out / "recipes").mkdir(parents=True, exist_ok=True)
        recipe_file = out / "recipes" / f"{slug}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"[demo] {method}: merge → evaluate → gate", flush=True)
        started = time.perf_counter()
        try:
            result = release(recipe_file, DEMO / "suite.jsonl", DEMO / "policy.yaml", out / slug,
                             eval=EvalOptions(progress=False), registry=registry, candidate_name=f"merged-{slug}")
        except Exception as exc:  # one method failing must not lose the others' results
            results[method] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[demo] {method} failed: {exc}", flush=True)
            continue
        results[method] = {
            "seconds": round(time.perf_counter() - started, 1),
            "recipe": {k: v for k, v in recipe.items() if k not in ("base_model", "models")},
            "models": [m["model"].replace(str(MODELS) + "/", "") for m in recipe["models"]],
            "calibration": [m["calibration"].replace(str(DEMO) + "/", "") for m in recipe["models"]
                            if "calibration" in m],
            "base_model": recipe["base_model"].replace(str(MODELS) + "/", ""),
            "cohorts": {d.cohort: {"candidate": round(d.candidate_mean, 4), "best_source": d.best_source,
                                   "best_source_mean": round(d.best_source_mean, 4), "decision": d.decision}
                        for d in result.gate.decisions},
        }
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def support_matrix() -> list[tuple[str, str, str, str]]:
    from mergegate.methods import available_methods

    ours = set(available_methods())
    try:
        from mergekit.merge_methods.registry import registered_methods

        theirs = {m.spec.name for m in registered_methods()}
    except ImportError:
        sys.exit("mergekit is needed to write the support matrix: pip install -e '.[dev]'")
    from peft.tuners.lora.model import LoraModel

    peft_source = inspect.getsource(LoraModel.add_weighted_adapter) + inspect.getsource(LoraModel)
    peft = {t for t in PEFT_TYPES if f'"{t}"' in peft_source}
    lora_types = set(__import__("mergegate.lora", fromlist=["COMBINATION_TYPES"]).COMBINATION_TYPES)
    rows = []
    for name in sorted(ours | theirs):
        rows.append((name, "yes" if name in ours else "—", "yes" if name in theirs else "—", "—"))
    for name in PEFT_TYPES:
        rows.append((f"LoRA combine: {name}", "yes" if name in lora_types else "—", "—",
                     "yes" if name in peft else "—"))
    rows += [("LoRA merge into base (`model+adapter`)", "yes", "yes", "yes (merge_and_unload)"),
             ("LoRA extract (truncated SVD of a delta)", "yes", "yes (mergekit-extract-lora)", "—"),
             ("vocabulary union / base / model + `tokenizer:` section", "yes", "yes", "—"),
             ("`slices` (passthrough, depth up-scaling)", "yes", "yes", "—")]
    return rows


def write_doc(demo: dict, minilm: Path) -> str:
    lines = ["# Merge methods", "",
             "Generated by `docs/generate_methods.py` from real runs; edit the script, not this file.", "",
             "## Support", "", "| method | mergegate | mergekit 0.1.5 | PEFT add_weighted_adapter |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in support_matrix()]
    lines += ["", "Agreement with mergekit and PEFT is checked by the tests (`tests/test_vs_mergekit.py`, "
              "`tests/methods/`, `tests/lora/`, `tests/test_vocab.py`), which report the max abs "
              "difference per case.", ""]
    lines += ["## On the demo: candidate score per cohort (gate decision)", "",
              "The demo's three full specialists plus the arithmetic LoRA folded into the base (`base+adapter`), merged "
              "by each method with the parameters shown, then evaluated on the held-out suite beside the base and "
              "every source and gated with `examples/demo/policy.yaml` (`mergegate release`). Two-model methods "
              "(slerp, nearswap, arcee_fusion) interpolate tool_required (as base_model) with json_output; nuslerp "
              "takes those two on the base. Retention = candidate / best source.", ""]
    cohorts = next((list(r["cohorts"]) for r in demo.values() if "cohorts" in r), [])
    ran = {m: r for m, r in demo.items() if "cohorts" in r}
    # Retention is against the best source of the full set (three specialists, the LoRA, the base), so the rows
    # of two-model methods, whose own gate only saw their two inputs, stay comparable with the others.
    best = {c: max(((r["cohorts"][c]["best_source_mean"], r["cohorts"][c]["best_source"]) for r in ran.values()))
            for c in cohorts}
    lines += ["| method | parameters | " + " | ".join(cohorts) + " | promoted |", "|---|---|" + "---|" * (len(cohorts) + 1)]
    for method, result in demo.items():
        if "error" in result:
            lines.append(f"| {method} | failed: {result['error'][:120]} |" + " |" * (len(cohorts) + 1))
            continue
        params = json.dumps(result["recipe"].get("parameters", {})).replace("|", "/")
        if result.get("calibration"):
            params += " + each source's own skill text"
        elif "calibration" in result["recipe"]:
            params += " + one text of every skill"
        if DEMO_RECIPES.get(method, {}).get("pair_on_base") or DEMO_RECIPES.get(method, {}).get("models") == PAIR:
            params += " (2 models)"
        cells = []
        for cohort in cohorts:
            c = result["cohorts"][cohort]
            cells.append(f"{c['candidate']:.2f} ({c['candidate'] / best[cohort][0]:.0%}, {c['decision']})")
        promoted = sum(c["decision"] == "promote" for c in result["cohorts"].values())
        lines.append(f"| {method} | {params} | " + " | ".join(cells) + f" | {promoted}/{len(cohorts)} |")
    if cohorts:
        lines += ["", "Best source per cohort (the 100% mark): " + ", ".join(
            f"{c} — {name} {mean:.2f}" for c, (mean, name) in best.items()) + ".", ""]
        for cohort in cohorts:
            top = sorted(ran, key=lambda m: -ran[m]["cohorts"][cohort]["candidate"])[:3]
            lines.append(f"- **{cohort}**: best kept by " + ", ".join(
                f"{m} ({ran[m]['cohorts'][cohort]['candidate'] / best[cohort][0]:.0%})" for m in top) + ".")
        same = [m for m in ("ram", "ramplus_tl") if m in ran and "linear" in ran and all(
            abs(ran[m]["cohorts"][c]["candidate"] - ran["linear"]["cohorts"][c]["candidate"]) < 0.005 for c in cohorts)]
        if same:
            lines.append(f"- {' and '.join(same)} score as linear here (within 0.005): they average only the deltas "
                         "that moved, and full fine-tunes move every weight; they are built for the sparse deltas "
                         "of RL fine-tuning.")
        own, shared = ran.get("regmean"), ran.get("regmean, shared calibration")
        if own and shared and "out_of_domain" in cohorts:
            o, sh = own["cohorts"], shared["cohorts"]
            lines.append(f"- regmean fits each layer to the text it is shown: with each source's own skill text it scores "
                         f"{o['out_of_domain']['candidate']:.2f} out of domain against {sh['out_of_domain']['candidate']:.2f} "
                         f"with one text covering every skill and generic sentences — calibration text should cover "
                         f"the traffic the merge will serve.")
    for method, reason in NOT_ON_DEMO.items():
        lines.append(f"\n`{method}` is not run on the demo: {reason}.")
    lines += ["", "## On a real pretrained model: MiniLM, one head per task", ""]
    table = minilm / "retention.md"
    results = minilm / "results.json"
    if results.is_file():
        ran_minilm = {m: r for m, r in json.loads(results.read_text())["methods"].items()
                      if r.get("status") == "ok" and len(r["tasks"]) > 2}
        top = sorted(ran_minilm, key=lambda m: -ran_minilm[m]["mean_retention"])
        lines.append("Mean retention over the four tasks, best first: " + ", ".join(
            f"{m} {ran_minilm[m]['mean_retention']:.1%}" for m in top) + ". The full table and settings follow.\n")
    if table.is_file():
        embedded = "\n".join(("###" + line[1:]) if line.startswith("# ") else line
                              for line in table.read_text().strip().splitlines())  # under this document's ##
        lines += [embedded, "", f"![retention](experiments/{minilm.name}/retention.png)"]
    else:
        lines.append("(not run: `docs/experiments/minilm_retention.py` produced no results)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", type=Path, default=ROOT / "demo-out" / "methods")
    parser.add_argument("--minilm-out", type=Path, default=HERE / "experiments" / "minilm-out")
    parser.add_argument("--rerun-demo", action="store_true")
    parser.add_argument("--methods", nargs="*", default=list(DEMO_RECIPES))
    parser.add_argument("--no-minilm", action="store_true", help="do not run the MiniLM experiment if missing")
    args = parser.parse_args()
    from mergegate.methods import available_methods

    methods = [m for m in args.methods if DEMO_RECIPES.get(m, {}).get("method", m) in available_methods()]
    demo = run_demo(args.demo_out, methods, args.rerun_demo)
    if not (args.minilm_out / "results.json").is_file() and not args.no_minilm:
        subprocess.run([sys.executable, str(HERE / "experiments" / "minilm_retention.py"), "--out",
                        str(args.minilm_out)], check=True)
    ordered = {m: demo[m] for m in DEMO_RECIPES if m in demo}
    (HERE / "methods.md").write_text(write_doc(ordered, args.minilm_out))
    print(f"wrote {HERE / 'methods.md'}")


if __name__ == "__main__":
    main()
