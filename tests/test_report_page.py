"""The page and table helpers every report is written with: a `|`, a backslash before it or a line break in a cell
never breaks a markdown table, and no cell reaches HTML unescaped."""

from __future__ import annotations

import re

from mergegate.report_page import html_table, markdown_table


def gfm_cells(line: str) -> list[str]:
    """A markdown table row's cells as GitHub's table parser splits them: at every `|` not escaped by a
    backslash (a backslash escapes the character after it, a backslash included)."""
    cells, cell, escaped = [], "", False
    for char in line.strip()[1:-1]:
        if escaped:
            cell, escaped = cell + char, False
        elif char == "\\":
            cell, escaped = cell + char, True
        elif char == "|":
            cells.append(cell)
            cell = ""
        else:
            cell += char
    return [*cells, cell]


def test_a_pipe_a_backslash_or_a_line_break_in_a_cell_keeps_every_row_as_wide_as_the_header():
    header = ["model", "answer"]
    rows = [["a|b", "x || y"], ["c\\|d", "one\ntwo\r\nthree"], ["plain", "trailing \\"]]
    lines = markdown_table(header, rows)
    assert len(lines) == 2 + len(rows)  # a line break in a cell never starts a new table row
    assert all(len(gfm_cells(line)) == len(header) for line in lines)
    assert lines[0] == "| model | answer |" and lines[1] == "|---|---|"
    assert gfm_cells(lines[2]) == [" a\\|b ", " x \\|\\| y "]
    assert lines[3] == "| c\\\\\\|d | one<br>two<br>three |"


def test_html_cells_are_escaped_and_the_table_scrolls_in_its_own_box():
    table = html_table(["<model>"], [["a|b & <c>"]])
    assert table == ('<div class="scroll"><table><tr><th>&lt;model&gt;</th></tr>'
                     "<tr><td>a|b &amp; &lt;c&gt;</td></tr></table></div>")
    assert not re.search(r"<(?!/?(div|table|tr|th|td)\b)", table)


def _tables(markdown: str) -> list[list[str]]:
    """The markdown tables of a page: runs of lines that start with `|`."""
    tables: list[list[str]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    return tables


def _pipe_release(tmp_path):
    """A release (gate, plan, report folder) whose candidate and source names hold a `|`."""
    from mergegate.gate import CohortDecision, GateResult, Policy
    from mergegate.model_ref import ModelRef
    from mergegate.pipeline import ReleaseResult
    from mergegate.rollout import PlanModel, RolloutPlan, Route

    candidate, source = "merged|v2", "spec|ialist"
    decision = CohortDecision(cohort="json|output", decision="promote", model=candidate, rows=20, candidate_mean=0.9,
                              best_source=source, best_source_mean=0.85, base_mean=0.2, diff_mean=0.05,
                              diff_low=-0.01, diff_high=0.1, retention=1.05, retention_low=0.98, retention_high=1.1,
                              source_means={"base": 0.2, source: 0.85}, reasons=("a | in a reason\nover two lines",),
                              fallback=(source, "base"))
    policy = Policy()
    gate = GateResult(candidate, [decision], {candidate: 0.9, "base": 0.2, source: 0.85}, policy.sha256)
    for folder in ("merged", "spec", "base"):
        (tmp_path / "models" / folder).mkdir(parents=True)
    path = lambda folder: str(tmp_path / "models" / folder)  # noqa: E731
    plan = RolloutPlan(candidate=candidate, models={candidate: PlanModel(role="candidate", path=path("merged")),
                                                    source: PlanModel(role="source", path=path("spec")),
                                                    "base": PlanModel(role="base", path=path("base"))},
                       routes={"json|output": Route(model=candidate, decision="promote")}, default=Route(model="base"))
    folder = tmp_path / "demo" / candidate  # the demo keeps each method's release in OUT/<method>
    folder.mkdir(parents=True)
    plan.save(folder / "rollout.yaml")
    return ReleaseResult(folder, ModelRef(candidate, folder), gate, plan, {}, {}), policy


def test_a_pipe_in_a_name_keeps_every_table_of_the_release_report_and_the_demo_summary_intact(tmp_path):
    """The release report and the demo's summary (its method table and its sections' tables): a model, method or
    cohort named with a `|` stays in its cell."""
    from mergegate.demo.release import _write_summary
    from mergegate.demo.sections import Section
    from mergegate.report import write_reports

    result, policy = _pipe_release(tmp_path)
    write_reports(tmp_path / "report", result.gate, result.plan, title="pipes", policy=policy)
    section = Section("A section", "section", ["text", (["model", "answer"], [["merged|v2", "a | b"]])])
    _write_summary(tmp_path / "demo", {"merged|v2": result}, "merged|v2", policy, beyond=[section])
    for page in (tmp_path / "report" / "report.md", tmp_path / "demo" / "report.md"):
        tables = _tables(page.read_text())
        assert len(tables) >= 3
        for table in tables:
            assert [len(gfm_cells(line)) for line in table] == [len(gfm_cells(table[0]))] * len(table), page
