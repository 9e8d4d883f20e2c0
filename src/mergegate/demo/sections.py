"""The summary's sections past one merged model (`mergegate demo --beyond`): what every section is made of, the
tables they share, and how a section is written as markdown, HTML and JSON.

The sections themselves, each released (or measured) beside the merges:

- `moe_section`: a mixture of the experts (`moe.build_moe`, gate_mode router_input), routers from `dev.jsonl`
  prompts per cohort (never the held-out suite), gated on the suite against the same base and sources as the merges.
- `cascade`: the best release's plan served in-process on loopback, every cohort's route a `cascade` from the best
  merge to the cohort's best source (escalating when the route's online check fails), cohorts routed by the
  gateway's classifier built from `dev.jsonl`; gated through the endpoint runner as the model `mergegate`.
- `gguf_section`: the best merge as q8_0 and q4_0, read back and compared with the source, tensor by tensor.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..costs import cohort_costs
from ..model_ref import ModelRef
from ..pipeline import ReleaseResult, release_rank
from ..registry import Registry
from ..report_page import html_table, markdown_table

Table = tuple[list[str], list[list[str]]]


@dataclass
class Section:
    """One part of the summary: a heading, then paragraphs (str) and tables ((header, rows)) in order."""

    title: str
    anchor: str
    blocks: list[str | Table] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class MergedDemo:
    """What every section starts from: the demo folder and the output folder, the merges' releases by method and
    the best of them, the registry they share, the base and sources they were gated against, and the console."""

    demo: Path
    out: Path
    results: dict[str, ReleaseResult]
    best: str
    registry: Registry
    base: ModelRef
    sources: list[ModelRef]
    console: Any


def _decisions(result: ReleaseResult) -> dict[str, str]:
    return {d.cohort: d.decision for d in result.gate.decisions}


def _kept_by_no_merge(result: ReleaseResult, merges: dict[str, ReleaseResult]) -> list[str]:
    """Cohorts the candidate promotes that no merge promotes."""
    return [c for c, d in _decisions(result).items()
            if d == "promote" and all(_decisions(m).get(c) != "promote" for m in merges.values())]


def decision_table(candidate: str, result: ReleaseResult, merges: dict[str, ReleaseResult], best: str) -> Table:
    """Per cohort: the candidate's score and decision beside the best merge's, the merges that promote it and the
    best source."""
    header = ["cohort", candidate, f"best merge ({best})", "merges that promote it", "best source"]
    rows = []
    for d in result.gate.decisions:
        promoting = [m for m, r in merges.items() if _decisions(r).get(d.cohort) == "promote"]
        chosen = merges[best].gate.decision(d.cohort)
        rows.append([d.cohort, f"{d.candidate_mean:.3f} {d.decision}", f"{chosen.candidate_mean:.3f} {chosen.decision}",
                     ", ".join(promoting) or "none", f"{d.best_source} {d.best_source_mean:.3f}"])
    return header, rows


def outcome_line(name: str, result: ReleaseResult, merges: dict[str, ReleaseResult]) -> str:
    """One sentence: how many cohorts the candidate promotes, its worst retention, and what it keeps that no merge
    keeps."""
    promoted, worst = release_rank(result.gate)
    kept = _kept_by_no_merge(result, merges)
    return (f"{name}: {promoted} of {len(result.gate.decisions)} cohorts promoted "
            f"({', '.join(c for c, d in _decisions(result).items() if d == 'promote') or 'none'}), worst-cohort "
            f"retention {worst:.2f}; cohorts it keeps that no merge keeps: {', '.join(kept) or 'none'}. "
            f"Report: {result.out.name}/report.html.")


def latency_table(result: ReleaseResult, columns: list[tuple[str, str]], merge: ReleaseResult) -> Table:
    """p50 latency per row and cohort (ms) of the candidate beside the best merge, from the gates' rows."""
    costs = cohort_costs({name: run.results for name, run in {**merge.runs, **result.runs}.items()})
    cohorts = [d.cohort for d in result.gate.decisions]
    header = ["p50 latency per row (ms)", *(shown for _, shown in columns)]
    rows = [[c, *(f"{costs[name][c].latency_p50_ms:.0f}" if name in costs else "n/a" for name, _ in columns)]
            for c in cohorts]
    return header, rows


def section_markdown(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    for block in section.blocks:
        lines += [block, ""] if isinstance(block, str) else [*markdown_table(*block), ""]
    return lines


def section_html(section: Section) -> str:
    parts = [f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>']
    for block in section.blocks:
        parts.append(f"<p>{html.escape(block)}</p>" if isinstance(block, str) else html_table(*block))
    return "".join(parts) + "</section>"


def dumps(sections: list[Section]) -> str:
    """The sections as JSON (OUT/beyond.json), for tests and tools."""
    return json.dumps([{"title": s.title, "anchor": s.anchor, "seconds": s.seconds,
                        "blocks": [b if isinstance(b, str) else {"header": b[0], "rows": b[1]} for b in s.blocks]}
                       for s in sections], indent=1)
