"""`mergegate demo --beyond`: past one merged model, on the demo — a mixture of the experts, an ensemble at the
gateway, and the best merge exported to GGUF — each released (or measured) beside the merges.

- MoE (`moe.build_moe`, gate_mode router_input): routers from `dev.jsonl` prompts per cohort (never the held-out
  suite), gated on the suite against the same base and sources as the merges.
- Ensemble: the best release's plan served in-process on loopback, every cohort's route a `cascade` from the best
  merge to the cohort's best source (escalating when the route's online check fails), cohorts routed by the
  gateway's classifier built from `dev.jsonl`; gated through the endpoint runner as the model `mergegate`.
- GGUF: the best merge as q8_0 and q4_0, read back and compared with the source, tensor by tensor.

Each part returns a `Section` that the demo summary writes as markdown and as HTML."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .costs import cohort_costs
from .evaluate import load_suite
from .model_ref import EndpointSettings, ModelRef
from .pipeline import ReleaseResult, gate_release, release_rank
from .registry import Registry
from .rollout import Strategy, load_plan

# the demo's experts: a source folder (or base+adapter) and the dev.jsonl cohort whose prompts build its router row
MOE_EXPERTS = (("base", None, "out_of_domain"), ("base", "arithmetic_lora", "arithmetic"),
               ("tool_required", None, "tool_required"), ("json_output", None, "json_output"),
               ("policy_refusal", None, "policy_refusal"))
ROUTER_PROMPTS = 10  # dev.jsonl prompts per expert (docs/moe.md's measured routing uses 10)
GGUF_TYPES = ("q8_0", "q4_0")
ENSEMBLE_ENDPOINT = EndpointSettings(concurrency=4, timeout_s=120, retries=0)

Table = tuple[list[str], list[list[str]]]


@dataclass
class Section:
    """One part of the summary: a heading, then paragraphs (str) and tables ((header, rows)) in order."""

    title: str
    anchor: str
    blocks: list[str | Table] = field(default_factory=list)
    seconds: float = 0.0


def run_beyond(demo: Path, out: Path, results: dict[str, ReleaseResult], best: str, registry: Registry,
               base: ModelRef, sources: list[ModelRef], console) -> list[Section]:
    """The three parts, in order; each one's wall time is in its section."""
    sections = []
    for part in (_moe_section, _ensemble_section, _gguf_section):
        started = time.perf_counter()
        section = part(demo, out, results, best, registry, base, sources, console)
        section.seconds = time.perf_counter() - started
        section.blocks.append(f"Wall time of this part: {section.seconds:.0f} s.")
        sections.append(section)
    return sections


def _dev_prompts(demo: Path) -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {}
    for row in load_suite(demo / "dev.jsonl").rows:
        text = row.prompt if row.prompt is not None else "\n".join(m["content"] for m in row.chat() or [])
        prompts.setdefault(row.cohort, []).append(text)
    return prompts


def _decisions(result: ReleaseResult) -> dict[str, str]:
    return {d.cohort: d.decision for d in result.gate.decisions}


def _kept_by_no_merge(result: ReleaseResult, merges: dict[str, ReleaseResult]) -> list[str]:
    """Cohorts the candidate promotes that no merge promotes."""
    return [c for c, d in _decisions(result).items()
            if d == "promote" and all(_decisions(m).get(c) != "promote" for m in merges.values())]


def _decision_table(candidate: str, result: ReleaseResult, merges: dict[str, ReleaseResult], best: str) -> Table:
    header = ["cohort", candidate, f"best merge ({best})", "merges that promote it", "best source"]
    rows = []
    for d in result.gate.decisions:
        promoting = [m for m, r in merges.items() if _decisions(r).get(d.cohort) == "promote"]
        chosen = merges[best].gate.decision(d.cohort)
        rows.append([d.cohort, f"{d.candidate_mean:.3f} {d.decision}", f"{chosen.candidate_mean:.3f} {chosen.decision}",
                     ", ".join(promoting) or "none", f"{d.best_source} {d.best_source_mean:.3f}"])
    return header, rows


def _outcome_line(name: str, result: ReleaseResult, merges: dict[str, ReleaseResult]) -> str:
    promoted, worst = release_rank(result.gate)
    kept = _kept_by_no_merge(result, merges)
    return (f"{name}: {promoted} of {len(result.gate.decisions)} cohorts promoted "
            f"({', '.join(c for c, d in _decisions(result).items() if d == 'promote') or 'none'}), worst-cohort "
            f"retention {worst:.2f}; cohorts it keeps that no merge keeps: {', '.join(kept) or 'none'}. "
            f"Report: {result.out.name}/report.html.")


def _moe_section(demo, out, results, best, registry, base, sources, console) -> Section:
    from .io.read import Checkpoint
    from .moe import build_moe

    section = Section("Mixture of experts from the dense experts", "moe")
    models = demo / "models"
    prompts = _dev_prompts(demo)
    experts = [{"source_model": str(models / folder) + (f"+{models / adapter}" if adapter else ""),
                "positive_prompts": prompts[cohort][:ROUTER_PROMPTS]} for folder, adapter, cohort in MOE_EXPERTS]
    config = {"base_model": str(models / "base"), "gate_mode": "router_input", "experts": experts}
    console.print(f"[bold]moe[/]: {len(experts)} experts, router_input gate from dev.jsonl → evaluate → gate")
    built = build_moe(config, out / "moe" / "candidate", overwrite=True)
    result = gate_release(ModelRef("moe", built.out_dir), base, sources, demo / "suite.jsonl", demo / "policy.yaml",
                          out / "moe", registry=registry, title="mergegate demo: mixture of experts")
    checkpoint = Checkpoint(models / "base")
    dense = sum(_numel(checkpoint.tensors[name].shape) for name in checkpoint.tensors)
    section.blocks += [
        f"A Mixtral built by `mergegate moe` ({len(experts)} experts: base, base+arithmetic_lora, tool_required, "
        f"json_output, policy_refusal; attention and embeddings from the base; gate_mode router_input from the "
        f"first {ROUTER_PROMPTS} dev.jsonl prompts of each expert's cohort), gated on the suite against the same "
        "base and sources as the merges.",
        _outcome_line("MoE", result, results),
        _decision_table("moe", result, results, best),
        f"Cost: {built.parameters / 1e6:.2f} M parameters against {dense / 1e6:.2f} M for one dense model "
        f"({built.active_parameters / 1e6:.2f} M active per token, {built.provenance.get('experts_per_token', 2)} "
        "experts per token).",
        _latency_table(result, [("moe", "moe"), (f"merged-{best}", f"best merge ({best})")],
                       results[best]),
    ]
    return section


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _latency_table(result: ReleaseResult, columns: list[tuple[str, str]], merge: ReleaseResult) -> Table:
    """p50 latency per row and cohort (ms) of the candidate beside the best merge, from the gates' rows."""
    costs = cohort_costs({name: run.results for name, run in {**merge.runs, **result.runs}.items()})
    cohorts = [d.cohort for d in result.gate.decisions]
    header = ["p50 latency per row (ms)", *(shown for _, shown in columns)]
    rows = [[c, *(f"{costs[name][c].latency_p50_ms:.0f}" if name in costs else "n/a" for name, _ in columns)]
            for c in cohorts]
    return header, rows


def _ensemble_section(demo, out, results, best, registry, base, sources, console) -> Section:
    import httpx

    from .gateway import GatewayConfig, create_app
    from .gateway.testing import ServerThread

    section = Section("Ensemble at the gateway: cascade from the best merge to the specialist", "ensemble")
    chosen = results[best]
    plan = load_plan(chosen.out / "rollout.yaml")
    merged = plan.candidate
    routes = {}
    for cohort, route in plan.routes.items():
        specialist = chosen.gate.decision(cohort).best_source
        models = list(dict.fromkeys([merged, specialist]))
        routes[cohort] = route.model_copy(update={"model": merged, "mirror": 0.0, "decision": None,
                                                  "fallback": [m for m in route.fallback if m not in models],
                                                  "strategy": Strategy(kind="cascade", models=models)})
    # the default route answers as the policy's default cohort does (the plan copies that route)
    ensemble_plan = plan.model_copy(update={"routes": routes,
                                            "default": routes.get(_default_cohort(demo) or "", plan.default)})
    folder = out / "ensemble"
    folder.mkdir(parents=True, exist_ok=True)
    ensemble_plan.save(folder / "ensembles.yaml")
    console.print(f"[bold]ensemble[/]: the best release's plan with a cascade per cohort ({merged} → the cohort's "
                  f"best source) served on loopback → evaluate as a candidate → gate")
    app = create_app(ensemble_plan, registry=Registry(folder / "gateway.sqlite"), suite=demo / "dev.jsonl",
                     config=GatewayConfig(backend_timeout=120.0, breaker_failures=1000))
    suite, left_out = _served_rows(demo / "suite.jsonl", folder / "suite.jsonl")
    with ServerThread(app) as server:
        candidate = ModelRef("ensemble", url=server.url + "/v1", served_model="mergegate")
        result = gate_release(candidate, base, sources, suite, _policy_for(demo / "policy.yaml", suite), folder,
                              registry=registry, endpoint=ENSEMBLE_ENDPOINT, title="mergegate demo: ensemble")
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    requests, extra = _per_cohort(metrics, "mergegate_strategy_requests_total"), \
        _per_cohort(metrics, "mergegate_strategy_extra_calls_total")
    total_requests, total_extra = sum(requests.values()), sum(extra.values())
    cached = result.runs["ensemble"].cached
    section.blocks += [
        f"The best release's plan ({best}) with every cohort's route a `cascade`: {merged} answers first and the "
        "cohort's best source answers when that answer fails the route's online check (json_valid, "
        "tool_selection; arithmetic, refusal and out-of-domain routes have none that escalates, so the merge's "
        "answer stands). Served in-process on 127.0.0.1 (ensemble/ensembles.yaml), requests routed by the "
        "gateway's classifier built from dev.jsonl, and gated through the endpoint runner as the model "
        "`mergegate`, on the suite's rows a server can answer (beside the same base and sources as the merges; "
        f"left out: {', '.join(left_out) or 'none'}, whose perplexity a completions endpoint does not give).",
        _outcome_line("Cascade", result, results),
        _decision_table("cascade", result, results, best),
        ("Extra cost, from the gateway's /metrics: " + (
            f"{total_extra:.0f} extra calls over {total_requests:.0f} requests "
            f"({total_extra / total_requests:.2f} per request)." if total_requests else
            "no requests reached the gateway (the evaluation was read from the registry's cache).")),
        (["route (classified cohort)", "requests", "extra calls", "extra calls per request"],
         [[c, f"{requests[c]:.0f}", f"{extra.get(c, 0):.0f}", f"{extra.get(c, 0) / requests[c]:.2f}"]
          for c in sorted(requests)]),
        _latency_table(result, [("ensemble", "cascade"), (f"merged-{best}", f"best merge ({best})")], chosen),
        *(["The ensemble's rows were read from the registry's cache (same gateway identity as an earlier run)."]
          if cached else []),
    ]
    return section


def _served_rows(suite: Path, target: Path) -> tuple[Path, list[str]]:
    """The suite without the rows a server cannot answer (perplexity needs the expected answer's likelihood),
    written to `target`; and the cohorts left out entirely, each with its row count."""
    kept: list[str] = []
    dropped: dict[str, int] = {}
    for line in suite.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "perplexity" in row.get("evaluators", []):
            dropped[row["cohort"]] = dropped.get(row["cohort"], 0) + 1
        else:
            kept.append(line)
    target.write_text("\n".join(kept) + "\n")
    return target, [f"{cohort} ({count} rows)" for cohort, count in dropped.items()]


def _policy_for(policy: Path, suite: Path) -> dict:
    """The demo policy without the cohorts (and the default route) a suite lacks: the rest judged as before."""
    import yaml

    cohorts = {json.loads(line)["cohort"] for line in suite.read_text().splitlines() if line.strip()}
    loaded = yaml.safe_load(policy.read_text())
    loaded["cohorts"] = {c: v for c, v in (loaded.get("cohorts") or {}).items() if c in cohorts}
    if loaded.get("default_route") not in cohorts:
        loaded.pop("default_route", None)
    return loaded


def _default_cohort(demo: Path) -> str | None:
    import yaml

    return (yaml.safe_load((demo / "policy.yaml").read_text()) or {}).get("default_route")


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')


def _per_cohort(metrics: str, name: str) -> dict[str, float]:
    """A Prometheus counter summed per `cohort` label."""
    totals: dict[str, float] = {}
    for line in metrics.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            cohort = re.search(r'cohort="([^"]*)"', match.group(2))
            key = cohort.group(1) if cohort else ""
            totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


def _gguf_section(demo, out, results, best, registry, base, sources, console) -> Section:
    from .export.gguf import export_gguf, quantization_error

    section = Section(f"Quantized release (GGUF) of the best merge ({best})", "gguf")
    folder = results[best].out / "candidate"
    console.print(f"[bold]gguf[/]: {best} → {', '.join(GGUF_TYPES)}")
    source_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = []
    for qtype in GGUF_TYPES:
        written = export_gguf(folder, out / "gguf" / f"merged-{best}-{qtype}.gguf", qtype, overwrite=True)
        worst = quantization_error(written, folder)
        rows.append([qtype, f"{written.path.stat().st_size / 1e6:.2f} MB",
                     f"{worst.ratio:.3f} ({worst.tensor})", f"{worst.relative:.2%}"])
    section.blocks += [
        f"The best merge ({best}, candidate/ with {source_bytes / 1e6:.2f} MB of safetensors) exported with "
        "`mergegate export-gguf` to gguf/, read back with the `gguf` package's reader and dequantizers, and "
        "compared with the source tensor by tensor (the bound: per 32-value block with largest magnitude m, "
        "q8_0 d/2 with d = m/127, q4_0 d with d = m/8, plus d's float16 rounding).",
        (["type", "file", "largest error / the format's bound (tensor)", "largest error / the matrix's largest magnitude"],
         rows),
        "llama.cpp (llama-cpp-python) is not installed here, so the GGUF files are not served or evaluated per "
        "cohort: what quantization costs each cohort is not measured.",
    ]
    return section


def section_markdown(section: Section, md_rows) -> list[str]:
    lines = [f"## {section.title}", ""]
    for block in section.blocks:
        lines += [block, ""] if isinstance(block, str) else [*md_rows(*block), ""]
    return lines


def section_html(section: Section, table) -> str:
    import html

    parts = [f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>']
    for block in section.blocks:
        parts.append(f"<p>{html.escape(block)}</p>" if isinstance(block, str) else table(*block))
    return "".join(parts) + "</section>"


def dumps(sections: list[Section]) -> str:
    """The sections as JSON (OUT/beyond.json), for tests and tools."""
    return json.dumps([{"title": s.title, "anchor": s.anchor, "seconds": s.seconds,
                        "blocks": [b if isinstance(b, str) else {"header": b[0], "rows": b[1]} for b in s.blocks]}
                       for s in sections], indent=1)
