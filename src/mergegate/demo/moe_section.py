"""The demo's mixture of experts: a Mixtral built from the dense experts, routers from `dev.jsonl` prompts per
cohort (never the held-out suite), gated on the suite against the same base and sources as the merges."""

from __future__ import annotations

from pathlib import Path

from ..evaluate import load_suite
from ..model_ref import ModelRef
from ..pipeline import gate_release
from .sections import MergedDemo, Section, decision_table, latency_table, outcome_line

# the demo's experts: a source folder (or base+adapter) and the dev.jsonl cohort whose prompts build its router row
MOE_EXPERTS = (("base", None, "out_of_domain"), ("base", "arithmetic_lora", "arithmetic"),
               ("tool_required", None, "tool_required"), ("json_output", None, "json_output"),
               ("policy_refusal", None, "policy_refusal"))
ROUTER_PROMPTS = 10  # dev.jsonl prompts per expert (docs/moe.md's measured routing uses 10)


def moe_section(run: MergedDemo) -> Section:
    from ..io.read import Checkpoint
    from ..moe import build_moe

    section = Section("Mixture of experts from the dense experts", "moe")
    models = run.demo / "models"
    prompts = _dev_prompts(run.demo)
    experts = [{"source_model": str(models / folder) + (f"+{models / adapter}" if adapter else ""),
                "positive_prompts": prompts[cohort][:ROUTER_PROMPTS]} for folder, adapter, cohort in MOE_EXPERTS]
    config = {"base_model": str(models / "base"), "gate_mode": "router_input", "experts": experts}
    run.console.print(f"[bold]moe[/]: {len(experts)} experts, router_input gate from dev.jsonl → evaluate → gate")
    built = build_moe(config, run.out / "moe" / "candidate", overwrite=True)
    result = gate_release(ModelRef("moe", built.out_dir), run.base, run.sources, run.demo / "suite.jsonl",
                          run.demo / "policy.yaml", run.out / "moe", registry=run.registry,
                          title="mergegate demo: mixture of experts")
    checkpoint = Checkpoint(models / "base")
    dense = sum(_numel(checkpoint.tensors[name].shape) for name in checkpoint.tensors)
    section.blocks += [
        f"A Mixtral built by `mergegate moe` ({len(experts)} experts: base, base+arithmetic_lora, tool_required, "
        f"json_output, policy_refusal; attention and embeddings from the base; gate_mode router_input from the "
        f"first {ROUTER_PROMPTS} dev.jsonl prompts of each expert's cohort), gated on the suite against the same "
        "base and sources as the merges.",
        outcome_line("MoE", result, run.results),
        decision_table("moe", result, run.results, run.best),
        f"Cost: {built.parameters / 1e6:.2f} M parameters against {dense / 1e6:.2f} M for one dense model "
        f"({built.active_parameters / 1e6:.2f} M active per token, {built.provenance.get('experts_per_token', 2)} "
        "experts per token).",
        latency_table(result, [("moe", "moe"), (f"merged-{run.best}", f"best merge ({run.best})")],
                      run.results[run.best]),
    ]
    return section


def _dev_prompts(demo: Path) -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {}
    for row in load_suite(demo / "dev.jsonl").rows:
        text = row.prompt if row.prompt is not None else "\n".join(m["content"] for m in row.chat() or [])
        prompts.setdefault(row.cohort, []).append(text)
    return prompts


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count
