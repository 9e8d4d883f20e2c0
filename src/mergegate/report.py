"""Release reports: report.md, a self-contained report.html (pictures embedded), and rollout.yaml. The plan
itself is built in rollout.py (`RolloutPlan.from_decisions`); this module only renders.

The page is written for a release manager. Its first screen says what ships: per cohort the route, the
decision, the fallback chain and the share mirrored to the candidate, the default route, and what changed
against the currently served plan when one is given. Then a forest plot of the paired differences with their
intervals against each cohort's −max_drop, the decisions with their reasons (folded), and per model and cohort
the mean score, latency and token cost. Latency depends on the machine, its load and the batch size, so each model's
latency says when it was measured, and a cohort whose models were not all measured in one run says so.

The pictures need matplotlib (the `report` extra). Without it the reports and the rollout plan are still
written, pictures left out, and one line says which extra draws them: the decisions never depend on a picture."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .costs import CohortCost
from .errors import MergegateError
from .gate import CohortDecision, GateResult, Policy
from .registry import Measurement, measured_together
from .report_page import figure_png, html_cells, html_img, html_page, html_table_around, markdown_table, pyplot
from .rollout import RolloutPlan, Route, load_plan

DECISION_COLOURS = {"promote": "#2e7d32", "hold": "#e0a800", "reject": "#c62828"}
TOLERATED_DROP = "drop established, within max_drop"
# Pictures a report may write beside itself; each is removed when not drawn, so none outlives its decisions.
PICTURES = ("forest.png", "chart.png")


def _max_drop(policy: Policy | None, cohort: str) -> float | None:
    return policy.rule(cohort).max_drop if policy is not None else None


def _scores_png(gate: GateResult, plt: Any) -> bytes:
    """Mean score per cohort of the candidate beside the base and every source, decisions over the candidate."""
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
    return figure_png(fig, plt)


def _forest_png(gate: GateResult, policy: Policy | None, plt: Any) -> bytes:
    """Per cohort: candidate − best source with its interval against that cohort's −max_drop (left), and
    retention with its interval against min_retention (right); coloured by decision."""
    from matplotlib.lines import Line2D

    decisions = gate.decisions
    count = len(decisions)
    labels: list[tuple[int, str, str]] = []  # drawn once the axis range is known, in one column on the right
    fig, (diff_ax, ret_ax) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.6 + 0.75 * count), dpi=110,
                                          gridspec_kw={"width_ratios": [3, 2]})
    level = f"{policy.confidence:.0%} " if policy is not None else ""
    for i, d in enumerate(decisions):
        y = count - 1 - i  # first cohort on top
        colour = DECISION_COLOURS[d.decision]
        tolerated = d.tolerated_drop  # the gate's flag: a drop established, within max_drop
        face = "white" if tolerated else colour
        diff_ax.errorbar([d.diff_mean], [y], xerr=[[d.diff_mean - d.diff_low], [d.diff_high - d.diff_mean]],
                         fmt="o", color=colour, mfc=face, mew=2, capsize=5, lw=2, ms=8)
        ret_ax.errorbar([d.retention], [y], xerr=[[d.retention - d.retention_low], [d.retention_high - d.retention]],
                        fmt="s", color=colour, mfc=face, mew=2, capsize=5, lw=2, ms=7)
        if policy is not None:
            rule = policy.rule(d.cohort)
            diff_ax.vlines(-rule.max_drop, y - 0.38, y + 0.38, colors="#7b1fa2", linestyles="--", lw=1.5)
            ret_ax.vlines(rule.min_retention, y - 0.38, y + 0.38, colors="#7b1fa2", linestyles="--", lw=1.5)
        label = d.decision.upper() + (f"\n{TOLERATED_DROP}" if tolerated else "")
        labels.append((y, label, colour))
    diff_ax.axvline(0, color="#555", lw=1)
    ret_ax.axvline(1, color="#555", lw=1)
    lows = [d.diff_low for d in decisions] + ([-policy.rule(d.cohort).max_drop for d in decisions] if policy else [])
    highs = [d.diff_high for d in decisions] + [0.0]
    span = max(highs) - min(lows) or 0.1
    # room on the right for the decision labels, aligned in one column clear of every interval and line
    diff_ax.set_xlim(min(lows) - 0.08 * span, max(highs) + 0.75 * span)
    for y, label, colour in labels:
        diff_ax.annotate(label, (max(highs) + 0.06 * span, y), va="center", fontsize=8, color=colour,
                         fontweight="bold")
    diff_ax.set_yticks(range(count), [d.cohort for d in reversed(decisions)], fontsize=9)
    diff_ax.set_ylim(-0.6, count - 0.4)
    diff_ax.set_xlabel(f"candidate − best source (paired mean, {level}interval)", fontsize=9)
    ret_ax.set_xlabel(f"retention: candidate / best source ({level}interval)", fontsize=9)
    for ax in (diff_ax, ret_ax):
        ax.grid(axis="x", color="#ddd", lw=0.6)
        ax.tick_params(axis="x", labelsize=8)
    handles = [Line2D([], [], color=c, marker="o", ls="", ms=7, label=name) for name, c in DECISION_COLOURS.items()]
    handles.append(Line2D([], [], color="#555", marker="o", mfc="white", mew=2, ls="", ms=7, label=TOLERATED_DROP))
    if policy is not None:
        handles.append(Line2D([], [], color="#7b1fa2", ls="--", label="−max_drop (left), min_retention (right)"))
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{gate.candidate}: paired difference and retention against the best source, per cohort",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if count < 4 else 0.05, 1, 1))
    return figure_png(fig, plt)


def report_pictures(gate: GateResult, policy: Policy | None = None) -> dict[str, bytes]:
    """file name → PNG bytes (the forest plot and the score chart); empty without matplotlib."""
    plt = pyplot()
    if plt is None:
        return {}
    return {"forest.png": _forest_png(gate, policy, plt), "chart.png": _scores_png(gate, plt)}


# ---- what ships ------------------------------------------------------------------------------------------------

def _route_text(route: Route, candidate: str) -> tuple[str, str, str]:
    """(model, fallback chain, mirrored share) of a route, as shown."""
    fallback = " → ".join(route.fallback) or "none"
    mirror = f"{route.mirror:.0%} to {candidate}" if route.mirror > 0 else "none"
    return route.model, fallback, mirror


def _route_change(before: Route | None, after: Route | None) -> str:
    if before is None and after is None:
        return ""
    if before is None:
        return "new cohort"
    if after is None:
        return "removed (goes to the default route)"
    changes = []
    if before.model != after.model:
        changes.append(f"model {before.model} → {after.model}")
    if before.fallback != after.fallback:
        changes.append(f"fallback {' → '.join(before.fallback) or 'none'} → {' → '.join(after.fallback) or 'none'}")
    if before.mirror != after.mirror:
        changes.append(f"mirror {before.mirror:.0%} → {after.mirror:.0%}")
    return "; ".join(changes) or "unchanged"


def plan_changes(current: RolloutPlan, plan: RolloutPlan) -> dict[str, str]:
    """route → what changed from `current` to `plan` ("unchanged" when nothing did); the default route under
    "default", cohorts only the current plan routes included."""
    cohorts = list(dict.fromkeys([*plan.routes, *current.routes]))
    changes = {cohort: _route_change(current.routes.get(cohort), plan.routes.get(cohort)) for cohort in cohorts}
    changes["default"] = _route_change(current.default, plan.default)
    return changes


def _ships_rows(gate: GateResult, plan: RolloutPlan,
                changes: dict[str, str] | None) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The "what ships" table: header, and (decision, cells) per route; the default route last."""
    header = ["route", "decision", "model", "fallback chain", "mirrored"] + (["vs current"] if changes else [])
    rows: list[tuple[str, list[str]]] = []
    for d in gate.decisions:
        route = plan.routes.get(d.cohort)
        if route is None:
            continue
        decision = d.decision.upper() + (f" ({TOLERATED_DROP})" if d.tolerated_drop else "")
        rows.append((d.decision, [d.cohort, decision, *_route_text(route, plan.candidate)]
                     + ([changes.get(d.cohort, "")] if changes else [])))
    default_note = "default (no cohort)"
    rows.append(("default", [default_note, "—", *_route_text(plan.default, plan.candidate)]
                 + ([changes["default"]] if changes else [])))
    if changes:
        for cohort, change in changes.items():
            if cohort != "default" and cohort not in plan.routes:
                rows.append(("removed", [cohort, "—", "—", "—", "—", change]))
    return header, rows


def _verdict(gate: GateResult) -> str:
    counts = {name: sum(d.decision == name for d in gate.decisions) for name in ("promote", "hold", "reject")}
    return (f"{gate.candidate} ships on {counts['promote']} of {len(gate.decisions)} cohort(s); "
            f"{counts['hold']} held on a source (mirrored to gather evidence), {counts['reject']} rejected.")


# ---- decisions and costs ---------------------------------------------------------------------------------------

def _decision_rows(gate: GateResult,
                   policy: Policy | None) -> tuple[list[str], list[tuple[CohortDecision, list[str], str]]]:
    header = ["cohort", "n", gate.candidate, "best source", "Δ vs best [CI]", "−max_drop", "retention [CI]",
              "decision", "route"]
    rows = []
    for d in gate.decisions:
        max_drop = _max_drop(policy, d.cohort)
        decision = d.decision.upper() + (f" · {TOLERATED_DROP}" if d.tolerated_drop else "")
        why = "; ".join(d.reasons) or "non-inferior within policy"
        rows.append((d, [d.cohort, str(d.rows), f"{d.candidate_mean:.3f}", f"{d.best_source} {d.best_source_mean:.3f}",
                         f"{d.diff_mean:+.3f} [{d.diff_low:+.3f}, {d.diff_high:+.3f}]",
                         f"{-max_drop:+.3f}" if max_drop is not None else "—",
                         f"{d.retention:.2f} [{d.retention_low:.2f}, {d.retention_high:.2f}]", decision, d.model], why))
    return header, rows


Measured = dict[str, dict[str, Measurement]]  # model → cohort → when its rows there were measured
APART = " †"  # marks a latency not measured in the same run as the others on its cohort


def _cohort_models(gate: GateResult, d: CohortDecision) -> dict[str, float]:
    """model → mean score on the cohort: the candidate, then the sources and the base."""
    return {gate.candidate: d.candidate_mean, **d.source_means}


def measured_apart(gate: GateResult, measured: Measured | None) -> list[str]:
    """The cohorts whose models' latencies were not all measured in one run (their latencies are not comparable)."""
    if measured is None:
        return []
    return [d.cohort for d in gate.decisions
            if not measured_together(measured[name][d.cohort] for name in _cohort_models(gate, d)
                                     if d.cohort in measured.get(name, {}))]


def _minute(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _when(m: Measurement | None) -> str:
    """When a model's rows on a cohort were measured, as shown: UTC to the minute, runs counted. Whether this command
    read them from the cache is left out: the same gate run twice renders the same report, and the time says it."""
    if m is None:
        return "—"
    if m.first is None or m.last is None:
        return "unknown (stored before measurement times were kept)"
    first, last = _minute(m.first), _minute(m.last)
    if last != first:
        first += " – " + (last[len("YYYY-MM-DD "):] if last[:10] == first[:10] else last)
    runs = len(m.sessions) + (1 if m.undated else 0)
    return (f"{runs} runs, " if runs > 1 else "") + f"{first} UTC"


def _cost_rows(gate: GateResult, costs: dict[str, dict[str, CohortCost]] | None,
               measured: Measured | None = None) -> tuple[list[str], list[list[str]]]:
    """Per cohort and model: mean score, and with costs latency p50/p99 (with `measured`, when they were measured,
    marked where the cohort's models were not all measured in one run) and mean prompt/completion tokens."""
    header = ["cohort", "model", "mean score"]
    if costs:
        header += ["rows", "latency p50 ms", "latency p99 ms", *(["latency measured"] if measured is not None else []),
                   "prompt tokens", "completion tokens"]
    apart = set(measured_apart(gate, measured))
    rows = []
    for d in gate.decisions:
        mark = APART if d.cohort in apart else ""
        for name, score in _cohort_models(gate, d).items():
            shown = name + (" (serves)" if name == d.model else "")
            row = [d.cohort, shown, f"{score:.3f}"]
            if costs:
                cost = costs.get(name, {}).get(d.cohort)
                when = [_when((measured.get(name) or {}).get(d.cohort))] if measured is not None else []
                row += ([str(cost.rows), f"{cost.latency_p50_ms:.1f}{mark}", f"{cost.latency_p99_ms:.1f}{mark}", *when,
                         f"{cost.prompt_tokens_mean:.1f}", f"{cost.completion_tokens_mean:.1f}"]
                        if cost is not None else ["—"] * (5 + len(when)))
            rows.append(row)
    return header, rows


def _latency_note(gate: GateResult, measured: Measured | None) -> str:
    """Why some latencies are marked, or nothing when all were measured together."""
    apart = measured_apart(gate, measured)
    if not apart:
        return ""
    return (f"{APART.strip()} Latencies on {', '.join(apart)} were not all measured in one run (rows read from the "
            "cache were measured at another time, under another load, perhaps in batches of another size): they "
            "are not comparable across models. Compare only models measured in the same run, or evaluate them "
            "again together.")


def _models_heading(costs: dict[str, dict[str, CohortCost]] | None) -> str:
    return "Scores, latency and tokens per model" if costs else "Scores per model"


# ---- markdown --------------------------------------------------------------------------------------------------

def render_markdown(  # noqa: PLR0913  (the report's parts, each optional and keyword-only)
        gate: GateResult, plan: RolloutPlan, *, title: str, policy: Policy | None = None,
                    costs: dict[str, dict[str, CohortCost]] | None = None, current: RolloutPlan | None = None,
                    pictures: tuple[str, ...] = (), picture_dir: str = "", lead: str = "",
                    after_ships: str = "", measured: Measured | None = None) -> str:
    """report.md. `pictures`: the picture files written (linked from `picture_dir`); `lead` and `after_ships`
    are Markdown put before and after the "what ships" section (the demo's summary uses them); `measured` says
    when each model's latencies were measured (`write_reports`)."""
    changes = plan_changes(current, plan) if current is not None else None
    ships_header, ships = _ships_rows(gate, plan, changes)
    md = [f"# {title}", ""] + ([lead, ""] if lead else [])
    md += ["## What ships", "", _verdict(gate), ""]
    md += markdown_table(ships_header, [cells for _, cells in ships])
    md += ["", "Requests no cohort claims take the default route. The mirrored share of a cohort's requests is "
           f"also sent to {plan.candidate}, its answers only recorded. Full plan: `rollout.yaml`."]
    if current is not None:
        md += ["", f"Compared with the currently served plan (candidate {current.candidate})."]
    md += [""] + ([after_ships, ""] if after_ships else [])
    md += ["## Intervals", ""]
    if "forest.png" in pictures:
        md += [f"![paired differences and retention per cohort]({picture_dir}forest.png)", ""]
    header, rows = _decision_rows(gate, policy)
    md += ["Per-cohort decisions: paired bootstrap against the best source on each cohort.", ""]
    md += markdown_table([*header, "why"], [[*cells, why] for _, cells, why in rows])
    aggregate = ", ".join(f"{name} {value:.3f}" for name, value in gate.aggregate.items())
    md += ["", f"## {_models_heading(costs)}", ""]
    md += markdown_table(*_cost_rows(gate, costs, measured))
    note = _latency_note(gate, measured) if costs else ""
    md += ["", note] if note else []
    md += ["", f"Aggregate mean over all rows (reported, not decisive): {aggregate}", ""]
    if "chart.png" in pictures:
        md += [f"![chart]({picture_dir}chart.png)", ""]
    md += [f"Policy sha256: `{gate.policy_sha256[:16]}`. Rollout plan: `rollout.yaml`.", ""]
    return "\n".join(md)


# ---- html ------------------------------------------------------------------------------------------------------

def _decision_class(cell: str) -> str:
    return "decision tolerated" if TOLERATED_DROP in cell else "decision"


def render_html_body(gate: GateResult, plan: RolloutPlan, *, title: str, policy: Policy | None = None,
                     costs: dict[str, dict[str, CohortCost]] | None = None, current: RolloutPlan | None = None,
                     pictures: dict[str, bytes] | None = None, lead: str = "", after_ships: str = "",
                     measured: Measured | None = None) -> str:
    """The page's body; `lead` and `after_ships` are HTML put before and after the "what ships" section;
    `measured` as for `render_markdown`."""
    pictures = pictures or {}
    changes = plan_changes(current, plan) if current is not None else None
    ships_header, ships = _ships_rows(gate, plan, changes)
    ships_body = "".join(f'<tr class="{kind}">{html_cells(cells, "td", {1: _decision_class(cells[1])})}</tr>'
                         for kind, cells in ships)
    compared = (f"<p>Compared with the currently served plan (candidate {html.escape(current.candidate)}).</p>"
                if current is not None else "")
    parts = [f"<h1>{html.escape(title)}</h1>", lead,
             f'<section id="what-ships"><h2>What ships</h2><p class="verdict">{html.escape(_verdict(gate))}</p>',
             html_table_around(ships_header, ships_body),
             f"<p>Requests no cohort claims take the default route. The mirrored share of a cohort's requests is also "
             f"sent to {html.escape(plan.candidate)}, its answers only recorded. Full plan: rollout.yaml.</p>"
             f"{compared}</section>", after_ships]

    header, rows = _decision_rows(gate, policy)
    numeric = {i: "num" for i in (1, 2, 4, 5, 6)}
    decision_column = header.index("decision")
    body = []
    for d, cells, why in rows:
        text = html_cells(cells, "td", {**numeric, decision_column: _decision_class(cells[decision_column])})
        short = d.reasons[0] if d.reasons else why
        summary = (short if len(d.reasons) <= 1 and len(short) <= 90
                   else f"{short[:90].rstrip()}… ({len(d.reasons)} reason{'s' if len(d.reasons) > 1 else ''})")
        body.append(f'<tr class="{d.decision}">{text}</tr><tr class="why"><td colspan="{len(header)}"><details>'
                    f'<summary>why: {html.escape(summary)}</summary><div class="reasons">{html.escape(why)}</div>'
                    "</details></td></tr>")
    parts += ['<section id="intervals"><h2>Intervals and decisions</h2>',
              html_img(pictures["forest.png"], "paired difference and retention per cohort, with intervals and −max_drop")
              if "forest.png" in pictures else "",
              "<p>Per-cohort decisions from paired bootstrap intervals against the best source on each cohort. A "
              "decision never comes from the aggregate mean.</p>",
              html_table_around(header, "".join(body)) + "</section>"]

    cost_header, cost_rows = _cost_rows(gate, costs, measured)
    note = _latency_note(gate, measured) if costs else ""
    aggregate = ", ".join(f"{name} {value:.3f}" for name, value in gate.aggregate.items())
    cost_body = "".join(f"<tr>{html_cells(row, 'td', {i: 'num' for i in range(2, len(row))})}</tr>" for row in cost_rows)
    parts += [f'<section id="models"><h2>{_models_heading(costs)}</h2>', html_table_around(cost_header, cost_body),
              f'<p class="latency-note">{html.escape(note)}</p>' if note else "",
              f"<p>Aggregate mean over all rows (reported, not decisive): {html.escape(aggregate)}</p>",
              html_img(pictures["chart.png"], "per-cohort scores") if "chart.png" in pictures else "",
              f"<p>Policy sha256: <code>{gate.policy_sha256[:16]}</code>.</p></section>"]
    return "\n".join(part for part in parts if part)


def _loaded_current(current: RolloutPlan | str | Path | None) -> RolloutPlan | None:
    return current if current is None or isinstance(current, RolloutPlan) else load_plan(current)


def write_reports(out: Path, gate: GateResult, plan: RolloutPlan, *, title: str, policy: Policy | None = None,
                  costs: dict[str, dict[str, CohortCost]] | None = None,
                  current: RolloutPlan | str | Path | None = None, measured: Measured | None = None) -> dict[str, Path]:
    """report.md, report.html, their pictures and rollout.yaml in `out`. `policy` (the one the gate applied) draws
    each cohort's −max_drop; `costs` (`costs.cohort_costs`) adds latency and token columns; `measured` (model →
    `Registry.measurements` of its run) says beside them when each was measured and marks the cohorts whose
    latencies were not measured in one run; `current` (the plan served now, or its file) adds what changed."""
    if policy is not None and policy.sha256 != gate.policy_sha256:
        raise MergegateError("report: the policy given is not the one the gate applied (sha256 differs)")
    current = _loaded_current(current)
    out.mkdir(parents=True, exist_ok=True)
    pictures = report_pictures(gate, policy)
    for name in PICTURES:
        if name in pictures:
            (out / name).write_bytes(pictures[name])
        else:
            (out / name).unlink(missing_ok=True)  # a picture from an earlier run would not match these decisions
    (out / "report.md").write_text(render_markdown(gate, plan, title=title, policy=policy, costs=costs,
                                                   current=current, pictures=tuple(pictures), measured=measured))
    body = render_html_body(gate, plan, title=title, policy=policy, costs=costs, current=current, pictures=pictures,
                            measured=measured)
    (out / "report.html").write_text(html_page(title, body))
    plan.save(out / "rollout.yaml")
    return {"md": out / "report.md", "html": out / "report.html", "rollout": out / "rollout.yaml"}
