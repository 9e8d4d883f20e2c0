"""`mergegate demo`: the release workflow on the shipped demo models, with several merge methods.

Each method's candidate is merged, evaluated beside the base and every source on the held-out suite, and
gated per cohort. Sources are evaluated once (the registry caches runs by model, suite and run config). The
summary shows which method wins which cohort and what the gate decided; the top-level report and rollout plan
are those of the best release (`pipeline.release_rank`: most cohorts promoted, then the best worst-cohort
retention; never a mean).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Sequence

from ..costs import cohort_costs
from ..errors import MergegateError
from ..gate import Policy, load_policy
from ..model_ref import ModelRef
from ..pipeline import ReleaseResult, release, release_rank
from ..registry import Registry
from ..report import render_html_body, render_markdown
from ..report_page import figure_png, html_img, html_page, html_table, markdown_table, pyplot
from ..rollout import load_plan
from .cascade import cascade_section
from .gguf_section import gguf_section
from .moe_section import moe_section
from .real_model import ensure_base, retention_rows, retention_section, served_chat_section
from .sections import MergedDemo, Section, dumps, section_html, section_markdown

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


EXAMPLES = ("demo", "smollm2")  # examples/<name>: the tiny demo, and the real pretrained model (demo.real_model)


def find_demo_folder(start: Path | None = None, example: str = "demo") -> Path:
    """examples/<example> in the working directory or in the source checkout this package runs from."""
    if example not in EXAMPLES:
        raise MergegateError(f"--model {example!r}: the demos are {', '.join(EXAMPLES)}")
    candidates = [Path.cwd() / "examples" / example, Path(__file__).resolve().parents[3] / "examples" / example]
    if start is not None:
        candidates.insert(0, Path(start))
    for folder in candidates:
        if (folder / "suite.jsonl").is_file():
            return folder
    raise FileNotFoundError(f"the demo models were not found (expected examples/{example} with suite.jsonl); "
                            "run from a mergegate checkout or pass --models")


RANKING = ("ranked by cohorts promoted, then by worst-cohort retention (the lowest retention over cohorts); "
           "never by a mean. A tie keeps the method listed first.")


SEARCH_PARALLEL = 2  # the demo search's trials in flight (each trial takes one core)


def run_demo(out: Path, models: Path | None = None, methods=METHODS, search_trials: int = 0, beyond: bool = False,
             example: str = "demo") -> dict[str, ReleaseResult]:
    """Release the demo with each hand-written method; with `search_trials`, also run that many trials of the
    merge search (examples/demo/search/space.yaml, scored on dev.jsonl) into OUT/search and release its winner on
    the same suite, reported beside the hand-written methods. With `beyond`, also gate a mixture of the experts
    and a cascade served by the gateway beside the merges, and export the best merge to GGUF (`demo.sections`).

    `example="smollm2"` runs the same loop on the real pretrained model and its LoRA specialists
    (examples/smollm2, `demo.real_model`), prints each merge's retention per cohort, serves the best release's
    plan and sends it one chat per cohort through the OpenAI client, and exports the best merge to GGUF."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    demo = find_demo_folder(models, example)
    if example == EXAMPLES[1]:
        if beyond:
            raise MergegateError("--beyond runs on the tiny demo only (the real-model demo serves its best release "
                                 "and exports it to GGUF by itself)")
        ensure_base(demo, say=console.print)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry(out / "registry.sqlite")
    started = time.perf_counter()
    # The LoRA specialist is not merged (adapter merging is a later stage) but is a source the gate may hold
    # a cohort on, served as base + adapter.
    adapters = [ModelRef(p.name, demo / "models" / "base", adapter=p) for p in sorted((demo / "models").iterdir())
                if (p / "adapter_config.json").is_file()] if (demo / "models").is_dir() else []
    results = {}
    for method in methods:
        console.print(f"[bold]{method}[/]: merge → evaluate (base and every source) → gate")
        results[method] = release(demo / "recipes" / f"{method}.yaml", demo / "suite.jsonl", demo / "policy.yaml",
                                  out / method, registry=registry, candidate_name=f"merged-{method}",
                                  extra_sources=adapters)
    cohorts = [d.cohort for d in results[methods[0]].gate.decisions]
    table = Table(title="candidate score per cohort and the gate's decision (best source in the last column)")
    table.add_column("cohort")
    for method in methods:
        table.add_column(method, justify="right")
    table.add_column("best source", justify="right")
    for cohort in cohorts:
        cells = {m: results[m].gate.decision(cohort) for m in methods}
        winner = max(methods, key=lambda m: cells[m].candidate_mean)
        row = [f"{'[bold]' if m == winner else ''}{cells[m].candidate_mean:.3f} {cells[m].decision}"
               f"{'[/]' if m == winner else ''}" for m in methods]
        first = cells[methods[0]]
        table.add_row(cohort, *row, f"{first.best_source} {first.best_source_mean:.3f}")
    console.print(table)
    best = max(methods, key=lambda m: release_rank(results[m].gate))  # max keeps the first of equals
    searched = _run_search(demo, out, search_trials, console, (best, *release_rank(results[best].gate))) \
        if search_trials else None
    header, rows = retention_rows(results, methods)
    retention = Table(title="retention: each merge's mean over the cohort's best source's (its specialist)")
    for name in header:
        retention.add_column(name, justify="left" if name == "cohort" else "right")
    for row in rows:
        retention.add_row(*row)
    console.print(retention)
    if example == EXAMPLES[1]:
        extra = _run_sections(demo, out, results, best, registry, adapters, console,
                              parts=(retention_section, served_chat_section, gguf_section))
    else:
        extra = _run_sections(demo, out, results, best, registry, adapters, console) if beyond else []
    _write_summary(out, results, best, load_policy(demo / "policy.yaml"), searched, extra)
    console.print(f"best release: [bold]{best}[/] ({RANKING}) Reports: {out / 'report.html'}, "
                  f"{out / 'report.md'}, rollout plan {out / 'rollout.yaml'}; per method in {out}/<method>/. "
                  f"{time.perf_counter() - started:.0f} s.")
    return results


def _run_sections(demo: Path, out: Path, results: dict[str, ReleaseResult], best: str, registry: Registry,
                  adapters: list[ModelRef], console, parts=(moe_section, cascade_section, gguf_section)
                  ) -> list[Section]:
    """The sections past one merged model (a mixture of experts, a cascade at the gateway, a GGUF export), in
    order, against the same base and sources as the merges (the first recipe's, plus the adapters); each one's wall
    time is in its section. They also go to OUT/beyond.json."""
    from ..pipeline import release_models
    from ..recipe import load_recipe

    first = next(iter(results))
    models = release_models(load_recipe(demo / "recipes" / f"{first}.yaml"), out / first / "candidate", "-")
    base = next(ref for ref, role in models if role == "base")
    sources = [ref for ref, role in models if role == "source"] + list(adapters)
    merged = MergedDemo(demo, out, results, best, registry, base, sources, console)
    sections = []
    for part in parts:
        started = time.perf_counter()
        section = part(merged)
        section.seconds = time.perf_counter() - started
        section.blocks.append(f"Wall time of this part: {section.seconds:.0f} s.")
        sections.append(section)
    (out / "beyond.json").write_text(dumps(sections))
    return sections


def _run_search(demo: Path, out: Path, trials: int, console, hand_written: tuple[str, int, float]) -> str:
    """The bounded merge search on the demo; returns the summary's line about its winner beside the best
    hand-written method (name, promoted, worst retention), as markdown."""
    from ..search import search

    console.print(f"[bold]merge search[/]: {trials} trials on dev.jsonl, {SEARCH_PARALLEL} in flight → "
                  f"{out / 'search'}; its best released on the suite")
    result = search(demo / "search" / "space.yaml", demo / "dev.jsonl", demo / "suite.jsonl", demo / "policy.yaml",
                    out / "search", trials=trials, parallel=min(SEARCH_PARALLEL, trials), keep=1)
    if not result.held_out:
        line = (f"Merge search ({trials} trials on dev.jsonl, [search/search.html](search/search.html)): no trial "
                "completed, nothing released.")
    else:
        held = result.held_out[0]
        cohorts = len(held.release.gate.decisions)
        line = (f"Merge search ({trials} trials on dev.jsonl, [search/search.html](search/search.html)): its winner, "
                f"trial {held.trial.number}, released on the same suite as the methods above "
                f"(search/held-out/trial-{held.trial.number}/): {held.promoted} of {cohorts} cohorts promoted, "
                f"worst-cohort retention {held.worst_retention:.2f} (best hand-written method, {hand_written[0]}: "
                f"{hand_written[1]} promoted, worst {hand_written[2]:.2f}).")
    console.print(line.replace("[search/search.html](search/search.html)", str(out / "search" / "search.html")))
    return line


def _write_summary(out: Path, results: dict[str, ReleaseResult], best: str, policy: Policy,
                   search_line: str | None = None, beyond: Sequence[Section] = ()) -> None:
    """The top-level report: what the best release ships first, then how every method fared and why this one
    was picked (and, after `mergegate demo --search`, how the search's winner fared on the same suite), then the
    best release's intervals, decisions and costs."""
    methods = list(results)
    chosen = results[best]
    cohorts = [d.cohort for d in chosen.gate.decisions]
    load_plan(out / best / "rollout.yaml").save(out / "rollout.yaml")  # re-anchors the relative model paths
    header = ["cohort", *methods, "best source"]
    rows = []
    for cohort in cohorts:
        first = results[methods[0]].gate.decision(cohort)
        rows.append([cohort, *(f"{results[m].gate.decision(cohort).candidate_mean:.3f} "
                               f"{results[m].gate.decision(cohort).decision}" for m in methods),
                     f"{first.best_source} {first.best_source_mean:.3f}"])
    rank_header = ["method", "cohorts promoted", "worst-cohort retention", "held", "rejected"]
    rank_rows = []
    for m in sorted(methods, key=lambda m: release_rank(results[m].gate), reverse=True):
        promoted, worst = release_rank(results[m].gate)
        decided = [d.decision for d in results[m].gate.decisions]
        rank_rows.append([m + (" (best)" if m == best else ""), f"{promoted} of {len(decided)}", f"{worst:.2f}",
                          str(decided.count("hold")), str(decided.count("reject"))])
    png = _summary_chart(results, cohorts)
    if png is None:
        (out / "summary.png").unlink(missing_ok=True)
    else:
        (out / "summary.png").write_bytes(png)
    costs = cohort_costs({name: run.results for name, run in chosen.runs.items()})
    lead = f"Best release: **{best}** ({RANKING}) Its rollout plan is `rollout.yaml`."
    methods_md = ["## Every method", "", "How the best release was picked:", "",
                  *markdown_table(rank_header, rank_rows), "",
                  "Candidate score per cohort and the gate's decision for each merge method. Per-method reports, "
                  "with intervals and reasons, are in each method's folder.", "",
                  *markdown_table(header, rows), "", *(["![summary](summary.png)"] if png is not None else []),
                  *(["", search_line] if search_line else []),
                  *(line for section in beyond for line in ["", *section_markdown(section)])]
    pictures = tuple(name for name in ("forest.png", "chart.png") if (out / best / name).is_file())
    (out / "report.md").write_text(render_markdown(
        chosen.gate, chosen.plan, title="mergegate demo", policy=policy, costs=costs, pictures=pictures,
        picture_dir=f"{best}/", lead=lead, after_ships="\n".join(methods_md), measured=chosen.measured))

    summary = html_img(png, "candidate score per cohort, every method") if png is not None else ""
    lead_html = f"<p>Best release: <b>{html.escape(best)}</b> ({html.escape(RANKING)}) Its rollout plan is rollout.yaml.</p>"
    methods_html = (f'<section id="methods"><h2>Every method</h2><p>How the best release was picked:</p>'
                    f"{html_table(rank_header, rank_rows)}<p>Candidate score per cohort and the gate's decision for each "
                    f"merge method (per-method reports in each method's folder).</p>{html_table(header, rows)}{summary}"
                    f"{_search_html(search_line)}</section>"
                    + "".join(section_html(section) for section in beyond))
    body = render_html_body(chosen.gate, chosen.plan, title="mergegate demo", policy=policy, costs=costs,
                            pictures={name: (out / best / name).read_bytes() for name in pictures}, lead=lead_html,
                            after_ships=methods_html, measured=chosen.measured)
    (out / "report.html").write_text(html_page("mergegate demo", body))


def _search_html(search_line: str | None) -> str:
    """The summary's markdown line about the search as HTML: its one link made a link."""
    if not search_line:
        return ""
    link = "[search/search.html](search/search.html)"
    before, _, after = search_line.partition(link)
    return (f'<p>{html.escape(before)}<a href="search/search.html">search/search.html</a>{html.escape(after)}</p>'
            if _ else f"<p>{html.escape(search_line)}</p>")


def _summary_chart(results: dict[str, ReleaseResult], cohorts: list[str]) -> bytes | None:
    """The summary chart as PNG bytes, or None without matplotlib (each method's report has said so already)."""
    plt = pyplot(say_missing=False)
    if plt is None:
        return None
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.7 * len(cohorts)), 3.8), dpi=110)
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cohorts))]
        ax.bar(xs, [results[method].gate.decision(c).candidate_mean for c in cohorts], width, label=method)
    first = results[methods[0]].gate
    for i, cohort in enumerate(cohorts):
        d = first.decision(cohort)
        ax.hlines(d.best_source_mean, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1)
    ax.set_xticks(range(len(cohorts)), cohorts, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("candidate mean score (dashed: best source)")
    ax.legend(fontsize=7, ncols=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return figure_png(fig, plt)
