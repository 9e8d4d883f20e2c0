"""`mergegate demo`: the release workflow on the shipped demo models, with several merge methods.

Each method's candidate is merged, evaluated beside the base and every source on the held-out suite, and
gated per cohort. Sources are evaluated once (the registry caches runs by model, suite and run config). The
summary shows which method wins which cohort and what the gate decided; the top-level report and rollout plan
are those of the method the gate promotes on the most cohorts.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from ._extras import missing_extra
from .model_ref import ModelRef
from .registry import Registry
from .pipeline import ReleaseResult, release
from .rollout import load_plan

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


def find_demo_folder(start: Path | None = None) -> Path:
    """examples/demo in the working directory or in the source checkout this package runs from."""
    candidates = [Path.cwd() / "examples" / "demo", Path(__file__).resolve().parents[2] / "examples" / "demo"]
    if start is not None:
        candidates.insert(0, Path(start))
    for folder in candidates:
        if (folder / "suite.jsonl").is_file():
            return folder
    raise FileNotFoundError("the demo models were not found (expected examples/demo with suite.jsonl); "
                            "run from a mergegate checkout or pass --models")


def _rank(result: ReleaseResult) -> tuple:
    decisions = [d.decision for d in result.gate.decisions]
    return (decisions.count("promote"), -decisions.count("reject"), result.gate.aggregate[result.candidate.name])


def run_demo(out: Path, models: Path | None = None, methods=METHODS) -> dict[str, ReleaseResult]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    demo = find_demo_folder(models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry(out / "registry.sqlite")
    started = time.perf_counter()
    # The LoRA specialist is not merged (adapter merging is a later stage) but is a source the gate may hold
    # a cohort on, served as base + adapter.
    adapters = [ModelRef(p.name, demo / "models" / "base", adapter=p) for p in sorted((demo / "models").iterdir())
                if (p / "adapter_config.json").is_file()]
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
    best = max(methods, key=lambda m: _rank(results[m]))
    _write_summary(out, results, best)
    console.print(f"best release: [bold]{best}[/] (most cohorts promoted). Reports: {out / 'report.html'}, "
                  f"{out / 'report.md'}, rollout plan {out / 'rollout.yaml'}; per method in {out}/<method>/. "
                  f"{time.perf_counter() - started:.0f} s.")
    return results


def _write_summary(out: Path, results: dict[str, ReleaseResult], best: str) -> None:
    methods = list(results)
    cohorts = [d.cohort for d in results[best].gate.decisions]
    load_plan(out / best / "rollout.yaml").save(out / "rollout.yaml")  # re-anchors the relative model paths
    header = ["cohort", *methods, "best source"]
    rows = []
    for cohort in cohorts:
        first = results[methods[0]].gate.decision(cohort)
        rows.append([cohort, *(f"{results[m].gate.decision(cohort).candidate_mean:.3f} "
                               f"{results[m].gate.decision(cohort).decision}" for m in methods),
                     f"{first.best_source} {first.best_source_mean:.3f}"])
    png = _summary_chart(results, cohorts)
    if png is None:
        (out / "summary.png").unlink(missing_ok=True)
    else:
        (out / "summary.png").write_bytes(png)
    md = ["# mergegate demo", "", "Candidate score per cohort and the gate's decision for each merge method.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in rows), "",
          f"Best release: **{best}** (most cohorts promoted); its rollout plan is `rollout.yaml`. Per-method "
          "reports, with intervals and reasons, are in each method's folder.", "",
          *(["![summary](summary.png)", ""] if png is not None else []),
          open(out / best / "report.md").read().replace("![chart](chart.png)", f"![chart]({best}/chart.png)")]
    (out / "report.md").write_text("\n".join(md))
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    best_html = (out / best / "report.html").read_text()
    best_body = best_html[best_html.index("<body>") + 6: best_html.index("</body>")]
    summary = (f'<img alt="summary" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
               if png is not None else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mergegate demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left}}th{{background:#eee}}</style></head><body>
<h1>mergegate demo</h1><p>Candidate score per cohort and the gate's decision, per merge method.
Best release: <b>{html.escape(best)}</b>.</p>
<table><tr>{cells(header, "th")}</tr>{"".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)}</table>
{summary}<hr>{best_body}</body></html>"""
    (out / "report.html").write_text(page)


def _summary_chart(results: dict[str, ReleaseResult], cohorts: list[str]) -> bytes | None:
    """The summary chart as PNG bytes, or None without matplotlib (each method's report has said so already)."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if missing_extra(exc) != "report":
            raise
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
