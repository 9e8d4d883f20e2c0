"""The demo's cascade at the gateway: the best release's plan served in-process on loopback, every cohort's route a
`cascade` from the best merge to the cohort's best source (escalating when the route's online check fails), cohorts
routed by the gateway's classifier built from `dev.jsonl`; gated through the endpoint runner as the model
`mergegate`."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluate import EvalOptions, load_suite
from ..gate import load_policy
from ..model_ref import EndpointSettings, ModelRef
from ..pipeline import gate_release
from ..registry import Registry
from ..rollout import load_plan
from .sections import MergedDemo, Section, decision_table, latency_table, outcome_line

ENSEMBLE_ENDPOINT = EndpointSettings(concurrency=4, timeout_s=120, retries=0)


def cascade_section(run: MergedDemo) -> Section:
    from ..gateway import GatewayConfig, create_app
    from ..serving.launcher import ServerThread

    demo, out, results, best, registry = run.demo, run.out, run.results, run.best, run.registry
    section = Section("Ensemble at the gateway: cascade from the best merge to the specialist", "ensemble")
    chosen = results[best]
    plan = load_plan(chosen.out / "rollout.yaml")
    merged = plan.candidate
    policy = load_policy(demo / "policy.yaml")
    # the default route answers as the policy's default cohort does (the plan copies that route)
    ensemble_plan = plan.with_cascades({cohort: chosen.gate.decision(cohort).best_source for cohort in plan.routes},
                                       default_cohort=policy.default_route)
    folder = out / "ensemble"
    folder.mkdir(parents=True, exist_ok=True)
    ensemble_plan.save(folder / "ensembles.yaml")
    run.console.print(f"[bold]ensemble[/]: the best release's plan with a cascade per cohort ({merged} → the "
                      f"cohort's best source) served on loopback → evaluate as a candidate → gate")
    app = create_app(ensemble_plan, registry=Registry(folder / "gateway.sqlite"), suite=demo / "dev.jsonl",
                     config=GatewayConfig(backend_timeout=120.0, breaker_failures=1000))
    suite, left_out = _served_rows(demo / "suite.jsonl", folder / "suite.jsonl")
    with ServerThread(app) as server:
        candidate = ModelRef("ensemble", url=server.url + "/v1", served_model="mergegate")
        # the policy's rules for the cohorts a server can answer: the rest judged as before
        result = gate_release(candidate, run.base, run.sources, suite, policy.for_cohorts(load_suite(suite).cohorts),
                              folder, eval=EvalOptions(endpoint=ENSEMBLE_ENDPOINT), registry=registry,
                              title="mergegate demo: ensemble")
    metrics = app.state.gateway.metrics  # the numbers its /metrics renders
    requests, extra = metrics.strategy_requests.totals("cohort"), metrics.strategy_extra_calls.totals("cohort")
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
        outcome_line("Cascade", result, results),
        decision_table("cascade", result, results, best),
        ("Extra cost, from the gateway's /metrics: " + (
            f"{total_extra:.0f} extra calls over {total_requests:.0f} requests "
            f"({total_extra / total_requests:.2f} per request)." if total_requests else
            "no requests reached the gateway (the evaluation was read from the registry's cache).")),
        (["route (classified cohort)", "requests", "extra calls", "extra calls per request"],
         [[c, f"{requests[c]:.0f}", f"{extra.get(c, 0):.0f}", f"{extra.get(c, 0) / requests[c]:.2f}"]
          for c in sorted(requests)]),
        latency_table(result, [("ensemble", "cascade"), (f"merged-{best}", f"best merge ({best})")], chosen),
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
