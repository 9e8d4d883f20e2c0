"""search.md / search.html: the trials, the best recipe's dev vs held-out gate, what its rollout costs to serve,
and — when no recipe keeps every cohort — the trade-off that says which cohort to route instead of merge.
Also writes best.yaml (the winning recipe as plain mergekit YAML) and rollout.yaml (its held-out gate's plan)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

from .._yaml import parse_yaml
from ..errors import SearchError
from ..evaluate import Suite
from ..gate import Policy
from ..model_ref import ModelRef
from ..report_page import figure_png, html_img, html_page, html_table, markdown_table, pyplot
from ..rollout import RolloutPlan
from .space import Space


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _recipe_data(recipe_yaml: str) -> dict:
    data = parse_yaml(recipe_yaml, "trial recipe", SearchError)
    return data if isinstance(data, dict) else {}


def _model_fields(data: dict) -> Iterator[tuple[dict, str]]:
    """Each place a recipe names a model (mapping, key): its base model, its models, its slices' base models and
    sources."""
    if isinstance(data.get("base_model"), str):
        yield data, "base_model"
    for entry in data.get("models") or []:
        yield entry, "model"
    for piece in data.get("slices") or []:
        if isinstance(piece.get("base_model"), str):
            yield piece, "base_model"
        for source in piece.get("sources") or []:
            yield source, "model"


def portable_recipe(recipe_yaml: str, recipe_folder: Path | None, out: Path) -> str:
    """The recipe with each model path relative to `out` (mergekit and `mergegate merge` read it from there);
    `model+adapter` keeps mergekit's spelling."""
    data = _recipe_data(recipe_yaml)

    def moved(path: Path) -> str:
        found = path if path.is_absolute() or recipe_folder is None else recipe_folder / path
        return os.path.relpath(found.resolve(), out.resolve()) if found.exists() else str(path)

    for holder, key in _model_fields(data):
        ref = ModelRef.parse(holder[key], name="model")
        if ref.path is not None:  # a recipe's models are local folders
            holder[key] = moved(ref.path) + (f"+{moved(ref.adapter)}" if ref.adapter is not None else "")
    return yaml.safe_dump(data, sort_keys=False)


def _names_adapters(recipe_yaml: str) -> bool:
    """Whether a model of the recipe is `model+adapter` (mergekit then needs --lora-merge-cache)."""
    data = _recipe_data(recipe_yaml)
    return any(ModelRef.parse(holder[key], name="model").adapter is not None for holder, key in _model_fields(data))


def serving_cost(plan: RolloutPlan) -> tuple[int, list[str]]:
    """How many models the plan's routes send traffic to first (what must be served), and their names."""
    served = sorted({route.model for route in [*plan.routes.values(), plan.default]})
    return len(served), served


def _method(record: Any) -> str:
    try:
        return str(_recipe_data(record.recipe_yaml).get("merge_method", "?"))
    except SearchError:
        return "?"


def _pictures(trials: list, best: list, held: list, cohorts: list[str]) -> dict[str, bytes]:
    plt = pyplot()
    complete = [t for t in trials if t.status == "complete"]
    if plt is None or not complete:
        return {}
    pictures = {}
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    xs = [t.number for t in complete]
    ax.scatter(xs, [t.worst_retention for t in complete], s=18, label="trial")
    running, best_so_far = [], None
    for t in complete:
        best_so_far = t if best_so_far is None or t.rank > best_so_far.rank else best_so_far
        running.append(best_so_far.worst_retention)
    ax.step(xs, running, where="post", color="tab:green", label="best so far (by cohorts promoted, then worst)")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("worst cohort's retention (dev)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    pictures["trials.png"] = figure_png(fig, plt)
    if best:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
        width = 0.4
        positions = range(len(cohorts))
        ax.bar([p - width / 2 for p in positions], [best[0].retention.get(c, 0.0) for c in cohorts], width,
               label=f"dev (trial {best[0].number})")
        if held:
            ax.bar([p + width / 2 for p in positions], [held[0].release.gate.decision(c).retention for c in cohorts],
                   width, label="held-out")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(positions), cohorts, rotation=15, fontsize=8)
        ax.set_ylabel("retention vs best source")
        ax.legend(fontsize=7)
        fig.tight_layout()
        pictures["best.png"] = figure_png(fig, plt)
        pair = sorted(cohorts, key=lambda c: best[0].retention.get(c, 0.0))[:2]
        if len(pair) == 2:
            a, b = pair
            points = [(t.retention.get(a, 0.0), t.retention.get(b, 0.0), t.number) for t in complete]
            front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)]
            fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=16, color="tab:blue", label="trial")
            front.sort()
            ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="tab:red", label="Pareto front")
            ax.set_xlabel(f"{a} retention (dev)")
            ax.set_ylabel(f"{b} retention (dev)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            pictures["pareto.png"] = figure_png(fig, plt)
    return pictures


def write_search_reports(out: Path, space: Space, trials: list, best: list, held: list, dev: Suite,
                         held_out: Suite, policy: Policy, options: Any) -> dict[str, Path]:
    cohorts = dev.cohorts
    written: dict[str, Path] = {}
    if best:
        recipe_text = portable_recipe(best[0].recipe_yaml, space.folder, out)
        written["best"] = out / "best.yaml"
        written["best"].write_text(
            f"# mergegate search: trial {best[0].number}, the best of {len(trials)} on the dev rows "
            f"({best[0].promoted} of {len(cohorts)} cohorts promoted, worst retention {_fmt(best[0].worst_retention)})."
            "\n# Plain mergekit YAML, paths relative to this folder: `mergegate merge best.yaml OUT`, or from this "
            "folder `mergekit-yaml best.yaml OUT`" + (" --lora-merge-cache DIR (mergekit folds the adapters there)"
                                                       if _names_adapters(recipe_text) else "") + ".\n" + recipe_text)
    if held:
        written["rollout"] = held[0].release.plan.save(out / "rollout.yaml")
    counts = {s: sum(t.status == s for t in trials) for s in ("complete", "pruned", "failed")}
    lines = [f"# merge search: {len(trials)} trials", "",
             f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed; objective "
             f"`{options.objective}`, seed {options.seed}. Trials saw only the dev rows ({dev.path}, {len(dev.rows)} "
             f"rows); the best {len(held)} were then gated on the held-out rows ({held_out.path}, "
             f"{len(held_out.rows)} rows).", ""]
    summary = ""
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    if held:
        top, release = best[0], held[0].release
        n_served, served = serving_cost(release.plan)
        n_sources = len({d.best_source for d in release.gate.decisions})  # without the merge: each on its best
        promoted_held = held[0].promoted
        saving = (f"{n_served} model(s) take traffic ({', '.join(served)}) instead of {n_sources}: each promoted "
                  "cohort is a source model the team no longer has to serve (without the merge each cohort runs on its "
                  "best source)" if n_served < n_sources else
                  f"{n_served} model(s) take traffic ({', '.join(served)}), as many as without the merge (each cohort "
                  "on its best source): the candidate saves no model here")
        summary = (f"Best recipe: trial {top.number} ({_method(top)}): dev {top.promoted}/{len(cohorts)} cohorts "
                   f"promoted, worst retention {_fmt(top.worst_retention)}; held-out {promoted_held}/{len(cohorts)} "
                   f"promoted, worst retention {_fmt(held[0].worst_retention)}. Serving cost of its rollout plan: "
                   f"{saving}.")
        never = [c for c in cohorts if not any(t.decisions.get(c) == "promote" for t in trials)]
        if never:
            them = "it" if len(never) == 1 else "them"
            summary += (f" No trial kept {', '.join(never)} on the dev rows: across this space, merging {them} costs "
                        f"the other cohorts (see the Pareto front) — route {them} to the source model instead of "
                        "merging.")
        lines += [summary]
        tables.append(("Dev vs held-out, per cohort (best recipe)",
                       ["cohort", "dev: decision, retention", "held-out: decision, retention", "gap"],
                       [[c, f"{top.decisions.get(c, '-')} {_fmt(top.retention.get(c))}",
                         f"{release.gate.decision(c).decision} {_fmt(release.gate.decision(c).retention)}",
                         _fmt(release.gate.decision(c).retention - top.retention.get(c, 0.0))] for c in cohorts]))
        tables.append(("The kept trials on the held-out rows",
                       ["trial", "method", "dev promoted", "dev worst", "held-out promoted", "held-out worst", "report"],
                       [[str(h.trial.number), _method(h.trial), str(h.trial.promoted), _fmt(h.trial.worst_retention),
                         str(h.promoted), _fmt(h.worst_retention), str(h.release.reports["md"].relative_to(out))]
                        for h in held]))
    trial_rows = [[str(t.number), t.status, _method(t), "-" if t.promoted is None else str(t.promoted),
                   _fmt(t.worst_retention), _fmt(t.mean_score), *(_fmt(t.retention.get(c)) for c in cohorts),
                   (t.reason or "")[:160]] for t in trials]
    tables.append(("Trials (retention per cohort on the dev rows)",
                   ["trial", "status", "method", "promoted", "worst", "mean", *cohorts, "reason"], trial_rows))
    for heading, header, rows in tables:
        lines += ["", f"## {heading}", "", *markdown_table(header, rows)]
    lines += ["", "Why not the mean: a recipe that gains on one cohort and silently loses another can have the best "
              "mean score; ranking by cohorts promoted (the gate's interval rule) and then by the worst cohort's "
              "retention only rewards recipes that keep every cohort."]
    pictures = _pictures(trials, best, held, cohorts)
    for name, png in pictures.items():
        (out / name).write_bytes(png)
        lines += ["", f"![{name}]({name})"]
    written["md"] = out / "search.md"
    written["md"].write_text("\n".join(lines) + "\n")
    body = [f"<h1>merge search: {len(trials)} trials</h1>", f"<p>{html.escape(' '.join(lines[2:3]))}</p>"]
    if summary:
        body.append(f'<p class="lead">{html.escape(summary)}</p>')
    for name, alt in (("best.png", "per-cohort retention of the best recipe, dev vs held-out"),
                      ("trials.png", "worst cohort's retention per trial"), ("pareto.png", "Pareto front")):
        if name in pictures:
            body.append(html_img(pictures[name], alt))
    for heading, header, rows in tables:
        body.append(f"<h2>{html.escape(heading)}</h2>" + html_table(header, rows))
    written["html"] = out / "search.html"
    written["html"].write_text(html_page(f"merge search: {len(trials)} trials", "\n".join(body)))
    return written
