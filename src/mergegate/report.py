"""Release reports: report.md, a self-contained report.html (chart embedded), and rollout.yaml. The plan
itself is built in rollout.py (`RolloutPlan.from_decisions`); this module only renders.

The chart needs matplotlib (the `report` extra). Without it the reports and the rollout plan are still written,
chart left out, and one line says which extra draws it: the decisions never depend on the picture."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from ._extras import install_hint, missing_extra
from .gate import GateResult
from .rollout import RolloutPlan


def _chart_png(gate: GateResult) -> bytes | None:
    """The per-cohort chart as PNG bytes, or None (logged once per report) when matplotlib is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if missing_extra(exc) != "report":
            raise
        logging.getLogger(__name__).warning("mergegate: report written without its chart (matplotlib is not "
                                            "installed): %s", install_hint("report"))
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = [d.cohort for d in gate.decisions]
    names = [gate.candidate] + list(gate.decisions[0].source_means)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cohorts)), 3.8), dpi=110)
    for k, name in enumerate(names):
        values = [d.candidate_mean if name == gate.candidate else d.source_means[name] for d in gate.decisions]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cohorts))]
        bars = ax.bar(xs, values, width, label=name, edgecolor="black" if name == gate.candidate else None,
                      linewidth=1.2 if name == gate.candidate else 0)
        if name == gate.candidate:
            for bar, d in zip(bars, gate.decisions):
                ax.annotate(d.decision, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, fontweight="bold")
    ax.set_xticks(range(len(cohorts)), cohorts, rotation=0, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("mean row score")
    ax.set_title(f"{gate.candidate} vs base and sources, per cohort")
    ax.legend(fontsize=7, ncols=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _table_rows(gate: GateResult) -> tuple[list[str], list[list[str]]]:
    sources = list(gate.decisions[0].source_means)
    header = ["cohort", "n", gate.candidate, *sources, "best source", "Δ vs best [CI]", "retention [CI]",
              "decision", "route", "why"]
    rows = []
    for d in gate.decisions:
        rows.append([
            d.cohort, str(d.rows), f"{d.candidate_mean:.3f}", *(f"{d.source_means[s]:.3f}" for s in sources),
            d.best_source, f"{d.diff_mean:+.3f} [{d.diff_low:+.3f}, {d.diff_high:+.3f}]",
            f"{d.retention:.2f} [{d.retention_low:.2f}, {d.retention_high:.2f}]", d.decision.upper(), d.model,
            "; ".join(d.reasons) or "non-inferior within policy",
        ])
    return header, rows


def write_reports(out: Path, gate: GateResult, plan: RolloutPlan, *, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _table_rows(gate)
    png = _chart_png(gate)
    if png is None:
        (out / "chart.png").unlink(missing_ok=True)  # a chart from an earlier run would not match these decisions
    else:
        (out / "chart.png").write_bytes(png)
    aggregate = ", ".join(f"{name} {value:.3f}" for name, value in gate.aggregate.items())
    md = [f"# {title}", "", "Per-cohort decisions (paired bootstrap against the best source on each cohort).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", f"Aggregate mean over all rows (reported, not decisive): {aggregate}", "",
           f"Policy sha256: `{gate.policy_sha256[:16]}`. Rollout plan: `rollout.yaml`.", ""]
    md += ["![chart](chart.png)", ""] if png is not None else []
    (out / "report.md").write_text("\n".join(md))

    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    colors = {"PROMOTE": "#d9f2d9", "HOLD": "#fff2cc", "REJECT": "#f8d0d0"}
    body = "".join(f'<tr style="background:{colors.get(row[header.index("decision")], "")}">{cells(row, "td")}</tr>'
                   for row in rows)
    chart = (f'<img alt="per-cohort scores" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
             if png is not None else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left}}th{{background:#eee}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Per-cohort decisions from paired bootstrap intervals against the best source on
each cohort. A decision never comes from the aggregate mean.</p>
<table><tr>{cells(header, "th")}</tr>{body}</table>
<p>Aggregate mean over all rows (reported, not decisive): {html.escape(aggregate)}</p>
{chart}
</body></html>"""
    (out / "report.html").write_text(page)
    plan.save(out / "rollout.yaml")
    return {"md": out / "report.md", "html": out / "report.html", "rollout": out / "rollout.yaml"}
