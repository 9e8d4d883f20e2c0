"""Merge, adapters or a gate among them: per cohort, which release keeps it, and what each costs to serve.

`compare_adapters` evaluates, on the same suite rows and beside the base and every source (each adapter as its
own `base+adapter` model, plus any full fine-tunes), three kinds of candidate, and gates each one on its own with
the same policy (`gate.decide`, decisions recorded in the registry):

- each merge given (`merges`: folders merged beforehand, e.g. a release's candidate);
- `adapter-routes`: the cohort's own adapter on the shared base (cohorts with no adapter: the base alone), what a
  plan with `bases:` serves (docs/serving.md);
- `adapter-router`: a learned gate among the adapters (`evaluate.adapter_router`), trained on the calibration
  rows (never the suite) and saved to OUT/router, or read from a saved one.

The page (compare.html, compare.md) shows per cohort each candidate's decision and score against the best source,
and per serving plan what it holds and costs: the bytes of parameters held by the loaded modules (one merge; one
base + N adapters; N full models + the base, each loaded separately) and the per-request latency measured on the
suite's rows (p50 / p99; batched as the evaluation batched them, so compare plans measured in one run)."""

from __future__ import annotations

import gc
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .costs import cohort_cost
from .errors import MergegateError
from .evaluate import EvalOptions, ModelRun, Suite, evaluate_models, load_suite
from .gate import GateResult, Policy, decide, load_policy
from .model_ref import ModelRef, Role
from .registry import Registry, RowResult
from .report_page import html_page, html_table, markdown_table
from .rollout import PlanBase, PlanModel, RolloutPlan

ROUTES = "adapter-routes"
ROUTER = "adapter-router"


@dataclass(frozen=True)
class ServingCost:
    """One serving plan's cost: what it holds, the bytes of parameters held, per-request latency on the suite."""

    plan: str
    holds: str
    parameter_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass(frozen=True)
class Comparison:
    out: Path
    gates: dict[str, GateResult]  # candidate → its decisions
    costs: list[ServingCost]
    runs: dict[str, ModelRun]
    reports: dict[str, Path]


def compare_adapters(  # noqa: PLR0913  (the lineup, the rows, the rule, where, and how the router is made)
        base: ModelRef, adapters: Mapping[str, Path], suite: Suite | str | Path,
        policy: Policy | dict | str | Path | None, out: str | Path, *, merges: Sequence[ModelRef] = (),
        sources: Sequence[ModelRef] = (), calibration: str | Path | None = None, router: str | Path | None = None,
        eval: EvalOptions | None = None, registry: Registry | str | Path | None = None) -> Comparison:
    """Evaluate and gate the merges, the adapter routes and (with `calibration` or a saved `router`) the learned
    router, and write the comparison page to `out` (module docstring). `adapters` maps a cohort to the adapter
    that serves it (the adapter is named by its cohort)."""
    from .evaluate.adapter_router import BASE_CHOICE, AdapterRouter, load_labelled_calibration
    from .evaluate.adapters import AdapterCandidate, evaluate_adapter_candidate, load_shared, train_router
    from .evaluate.runner import check_models

    out = Path(out)
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    policy = load_policy(policy)
    policy.check_cohorts(suite.cohorts)
    if base.path is None or base.adapter is not None:
        raise MergegateError(f"compare: the base '{base.name}' must be a local folder without an adapter")
    if calibration is not None and router is not None:
        raise MergegateError("compare: give a calibration file to train a router, or a saved router, not both")
    adapters = {cohort: Path(path) for cohort, path in adapters.items()}
    unknown = sorted(set(adapters) - set(suite.cohorts))
    if not adapters or unknown:
        raise MergegateError(f"compare: adapters are named by the cohort they serve; {', '.join(unknown) or 'none'}"
                             f" given, the suite's cohorts: {', '.join(suite.cohorts)}")
    routes = {cohort: cohort for cohort in adapters}
    separate = [ModelRef(cohort, base.path, adapter=path) for cohort, path in adapters.items()]
    eval = eval if eval is not None else EvalOptions()
    lineup: list[tuple[ModelRef, Role]] = [(base, "base"), *((ref, "source") for ref in [*separate, *sources]),
              *((ref, "candidate") for ref in merges)]
    # every input checked before anything is evaluated or written: a typo should not cost an evaluation
    check_models([ref for ref, _ in lineup], eval.endpoint)
    learned = AdapterRouter.load(router) if router is not None else None
    if learned is not None:
        unknown = sorted(set(learned.choices) - set(adapters) - {BASE_CHOICE})
        if unknown or learned.base.resolve() != base.path.resolve():
            raise MergegateError(f"compare: router {router} was trained on base {learned.base} with adapters "
                                 f"{', '.join(learned.adapters)}, not on this base with these adapters")
    if calibration is not None:
        load_labelled_calibration(calibration)
    out.mkdir(parents=True, exist_ok=True)
    registry = registry if isinstance(registry, Registry) else Registry(registry or out / "registry.sqlite")

    runs = evaluate_models(lineup, suite, registry, eval)
    candidates = [AdapterCandidate(ROUTES, base.path, adapters, routes=routes)]
    if calibration is not None or learned is not None:
        if learned is None:
            assert calibration is not None
            model, tokenizer = load_shared(base.path, adapters, eval.resolved_device)
            learned = train_router(model, tokenizer, base.path, adapters, routes, calibration)
            learned.save(out / "router")
            del model
        candidates.append(AdapterCandidate(ROUTER, base.path, adapters, router=learned))
    for candidate in candidates:
        runs[candidate.name] = evaluate_adapter_candidate(candidate, suite, registry, eval)

    results = {name: run.results for name, run in runs.items()}
    source_names = [ref.name for ref in [*separate, *sources]]
    gates = {}
    for name in [*(ref.name for ref in merges), *(c.name for c in candidates)]:
        gates[name] = decide(results, candidate=name, base=base.name, sources=source_names, policy=policy)
        registry.add_decisions(runs[name].model_hash, suite.sha256, gates[name].policy_sha256, gates[name].decisions)
    costs = serving_costs(base, adapters, merges, sources, candidates, results, suite.cohorts, eval.resolved_device)
    reports = write_comparison(out, gates, costs, policy)
    for ref in merges:
        reports[f"{ref.name}/rollout"] = shared_base_plan(gates[ref.name], PlanModel.from_ref(ref, "candidate"), base,
                                                          adapters, sources, suite, policy).save(
                                                              _folder(out / ref.name) / "rollout.yaml")
    if learned is not None:
        router_model = PlanModel(role="candidate", base=SHARED, router=str((Path(router or out / "router")).absolute()))
        reports[f"{ROUTER}/rollout"] = shared_base_plan(gates[ROUTER], router_model, base, adapters, sources, suite,
                                                        policy).save(_folder(out / ROUTER) / "rollout.yaml")
    return Comparison(out, gates, costs, runs, reports)


SHARED = "shared"  # the name of the base the comparison's plans declare


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_base_plan(gate: GateResult, candidate: PlanModel, base: ModelRef, adapters: Mapping[str, Path],
                     sources: Sequence[ModelRef], suite: Suite, policy: Policy) -> RolloutPlan:
    """The rollout plan of a candidate's decisions in which the base and every adapter source are models on one
    shared base (`bases:`), loaded once by the gateway: a cohort the candidate does not keep falls back to its own
    adapter there, as to any source."""
    models = {base.name: PlanModel(role="base", base=SHARED),
              **{cohort: PlanModel(role="source", base=SHARED, adapter=str(path.absolute()))
                 for cohort, path in adapters.items()},
              **{ref.name: PlanModel.from_ref(ref, "source") for ref in sources},
              gate.candidate: candidate}
    bases = {SHARED: PlanBase(path=str(Path(str(base.path)).absolute()))}
    # the gate's plan, built over the models as folders, then given the shared base they stand on
    located = {name: PlanModel.from_ref(ModelRef(name, Path(str(base.path))), entry.role)
               if entry.base is not None else entry for name, entry in models.items()}
    plan = RolloutPlan.from_decisions(gate, located, suite, policy)
    return RolloutPlan.model_validate({**plan.model_dump(exclude_none=True), "bases": bases,
                                       "models": {name: entry.model_dump(exclude_none=True)
                                                  for name, entry in models.items()}})


def serving_costs(base: ModelRef, adapters: Mapping[str, Path], merges: Sequence[ModelRef], sources: Sequence[ModelRef],
                  candidates: Sequence, results: Mapping[str, list[RowResult]], cohorts: Sequence[str],
                  device: str) -> list[ServingCost]:
    """Each plan's held parameter bytes (its modules loaded, one plan at a time) and its rows' latency: one merge;
    the base with every adapter on it (and the router's tensors); every adapter as its own full model, every other
    source and the base beside them, each cohort served by its own model."""
    from .evaluate.adapters import held_parameter_bytes, load_shared
    from .evaluate.local import load_model

    def held(*refs: ModelRef) -> int:
        total = 0
        for ref in refs:
            model, _ = load_model(ref, device)
            total += held_parameter_bytes(model)
            del model
            gc.collect()
        return total

    def latency(rows: list[RowResult]) -> tuple[float, float]:
        cost = cohort_cost(rows)
        return cost.latency_p50_ms, cost.latency_p99_ms

    found = [ServingCost(ref.name, "one merged model", held(ref), *latency(results[ref.name])) for ref in merges]
    shared, _ = load_shared(Path(str(base.path)), adapters, device)
    shared_bytes = held_parameter_bytes(shared)
    del shared
    gc.collect()
    holds = f"one base + {len(adapters)} adapter{'s' if len(adapters) != 1 else ''}"
    for candidate in candidates:
        extra = 0
        if candidate.router is not None:
            extra = sum(t.numel() * t.element_size()
                        for t in (candidate.router.weight, candidate.router.bias, candidate.router.mean,
                                  candidate.router.scale))
        found.append(ServingCost(candidate.name, holds + (" + a router" if extra else ""), shared_bytes + extra,
                                 *latency(results[candidate.name])))
    full = [ModelRef(cohort, base.path, adapter=path) for cohort, path in adapters.items()]
    served_by = {cohort: cohort if cohort in adapters else base.name for cohort in cohorts}
    rows = [r for cohort, name in served_by.items() for r in results[name] if r.cohort == cohort]
    count = len(full) + len(sources)
    found.append(ServingCost("separate models", f"{count} full model{'s' if count != 1 else ''} + the base",
                             held(*full, *sources, base), *latency(rows)))
    return found


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def comparison_tables(gates: Mapping[str, GateResult],
                      costs: Sequence[ServingCost]) -> tuple[tuple[list[str], list[list[str]]],
                                                             tuple[list[str], list[list[str]]]]:
    """(header, rows) per cohort — each candidate's decision and mean beside the best source, and the candidates
    that keep it (promoted) — and per serving plan — what it holds, its bytes, its latency and the cohorts it keeps."""
    names = list(gates)
    first = next(iter(gates.values()))
    header = ["cohort", "best source", *names, "kept by"]
    rows = []
    for d in first.decisions:
        cells = [d.cohort, f"{d.best_source} {d.best_source_mean:.3f}"]
        kept = []
        for name in names:
            mine = gates[name].decision(d.cohort)
            cells.append(f"{mine.decision.upper()} {mine.candidate_mean:.3f}")
            if mine.decision == "promote":
                kept.append(name)
        rows.append([*cells, ", ".join(kept) or "none: its source stays"])
    cost_header = ["plan", "holds", "parameters held", "latency p50 ms", "latency p99 ms", "cohorts kept"]
    cost_rows = []
    for cost in costs:
        gate = gates.get(cost.plan)
        keeps = (f"{sum(d.decision == 'promote' for d in gate.decisions)} of {len(gate.decisions)}"
                 if gate is not None else "all (each cohort on its own model)")
        cost_rows.append([cost.plan, cost.holds, _mib(cost.parameter_bytes), f"{cost.latency_p50_ms:.1f}",
                          f"{cost.latency_p99_ms:.1f}", keeps])
    return (header, rows), (cost_header, cost_rows)


_NOTE = ("Parameters held: bytes of the loaded modules' parameters and buffers, each storage counted once. Latency: "
         "per row of the suite, as the evaluation batched the rows; compare plans measured in the same run. The "
         "separate models' plan serves each cohort with its own model (the base where no adapter serves it), so it "
         "keeps every source's score by construction.")


def write_comparison(out: Path, gates: Mapping[str, GateResult], costs: Sequence[ServingCost],
                     policy: Policy) -> dict[str, Path]:
    """compare.md and compare.html in `out`."""
    (header, rows), (cost_header, cost_rows) = comparison_tables(gates, costs)
    title = "Merge, adapters or a gate among them"
    lead = ("Each candidate gated on its own against the best source per cohort (policy sha256 "
            f"{policy.sha256[:16]}): PROMOTE keeps the cohort on it.")
    md = [f"# {title}", "", lead, "", "## Per cohort", "", *markdown_table(header, rows), "",
          "## Serving cost per plan", "", *markdown_table(cost_header, cost_rows), "", _NOTE, ""]
    (out / "compare.md").write_text("\n".join(md))
    reasons = "".join(f"<h3>{html.escape(name)}</h3><ul>" + "".join(
        f"<li><b>{html.escape(d.cohort)}</b>: {html.escape(d.decision)} — "
        f"{html.escape('; '.join(d.reasons) or 'non-inferior within policy')}</li>" for d in gate.decisions) + "</ul>"
        for name, gate in gates.items())
    body = (f"<h1>{html.escape(title)}</h1><p>{html.escape(lead)}</p><h2>Per cohort</h2>{html_table(header, rows)}"
            f"<h2>Serving cost per plan</h2>{html_table(cost_header, cost_rows)}<p>{html.escape(_NOTE)}</p>"
            f"<details><summary>why each decision</summary>{reasons}</details>")
    (out / "compare.html").write_text(html_page(title, body))
    return {"md": out / "compare.md", "html": out / "compare.html"}
