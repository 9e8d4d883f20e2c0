"""The release report: what ships first, the forest plot, tolerated drops, costs, the change against the served
plan, the release ranking, and the page's layout in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest

from mergegate.costs import CohortCost, cohort_cost, cohort_costs
from mergegate.errors import MergegateError
from mergegate.evaluate import EvalOptions
from mergegate.gate import CohortDecision, GateResult, Policy
from mergegate.pipeline import release_rank
from mergegate.registry import RowResult
from mergegate.report import TOLERATED_DROP, plan_changes, write_reports
from mergegate.rollout import PlanModel, RolloutPlan, Route

CANDIDATE = "merged-task_arithmetic-with-a-long-name"
POLICY = Policy.model_validate({"default": {"max_drop": 0.1, "min_retention": 0.85},
                                "cohorts": {"policy_refusal": {"max_drop": 0.05, "min_retention": 0.9}},
                                "default_route": "out_of_domain"})
LONG_REASON = ("paired difference vs tool_required_specialist: 95% interval [-0.412, -0.080] reaches below "
               "-max_drop -0.1; retention 0.712 of tool_required_specialist < min_retention 0.85")


def _decision(cohort: str, decision: str, diff: tuple[float, float, float], retention: float,
              model: str, reasons: tuple[str, ...] = (), mirror: float = 0.0) -> CohortDecision:
    """A decision as the gate makes it under POLICY (its drop flags against the cohort's max_drop)."""
    low, mean, high = diff
    return CohortDecision(cohort=cohort, decision=decision, model=model, rows=40,  # type: ignore[arg-type]
                          candidate_mean=0.8 + mean, best_source="specialist", best_source_mean=0.8, base_mean=0.3,
                          diff_mean=mean, diff_low=low, diff_high=high, retention=retention,
                          retention_low=retention - 0.05, retention_high=retention + 0.05,
                          source_means={"base": 0.3, "specialist": 0.8, "tool_required_specialist": 0.7},
                          reasons=reasons, mirror_share=mirror, fallback=("specialist", "base"),
                          drop_established=high < 0, within_max_drop=low >= -POLICY.rule(cohort).max_drop)


def _gate(policy: Policy = POLICY) -> GateResult:
    decisions = [
        _decision("json_output", "promote", (-0.02, 0.03, 0.08), 1.04, CANDIDATE),
        # the whole interval below zero, above -max_drop: promoted, the drop established
        _decision("out_of_domain", "promote", (-0.09, -0.06, -0.02), 0.93, CANDIDATE),
        _decision("tool_required", "hold", (-0.41, -0.2, 0.01), 0.71, "specialist",
                  reasons=(LONG_REASON, "only 40 row(s) and a second reason to make the row long"), mirror=0.1),
        _decision("policy_refusal", "reject", (-0.3, -0.2, -0.1), 0.7, "specialist",
                  reasons=("regression established: the whole interval is below -max_drop",)),
    ]
    return GateResult(CANDIDATE, decisions, {CANDIDATE: 0.7, "base": 0.3, "specialist": 0.8,
                                             "tool_required_specialist": 0.7}, policy.sha256)


def _plan(gate: GateResult) -> RolloutPlan:
    models = {name: PlanModel(role=role, path=f"/models/{name}")
              for name, role in ((CANDIDATE, "candidate"), ("base", "base"), ("specialist", "source"),
                                 ("tool_required_specialist", "source"))}
    routes = {d.cohort: Route(model=d.model, fallback=list(d.fallback), mirror=d.mirror_share, decision=d.decision)
              for d in gate.decisions}
    return RolloutPlan(candidate=CANDIDATE, models=models, routes=routes,
                       default=routes["out_of_domain"].model_copy(update={"decision": None}))


def _rows(model: str, cohort: str, latencies: list[float], prompt: int = 10, completion: int = 4) -> list[RowResult]:
    return [RowResult(row_id=f"{cohort}{i}", cohort=cohort, model_name=model, model_hash="h", output="out",
                      prompt_tokens=prompt + i, completion_tokens=completion, latency_ms=latency, score=1.0,
                      passed=True, details={}) for i, latency in enumerate(latencies)]


def _costs(gate: GateResult) -> dict[str, dict[str, CohortCost]]:
    results = {name: [row for d in gate.decisions for row in _rows(name, d.cohort, [10.0, 20.0, 30.0, 400.0])]
               for name in gate.aggregate}
    return cohort_costs(results)


def test_cohort_costs_give_latency_percentiles_and_mean_tokens_per_model_and_cohort():
    rows = _rows("m", "a", [float(v) for v in range(1, 101)]) + _rows("m", "b", [5.0], prompt=7, completion=3)
    costs = cohort_costs({"m": rows, "empty": []})
    a = costs["m"]["a"]
    assert a.rows == 100 and a.latency_p50_ms == pytest.approx(50.5) and a.latency_p99_ms == pytest.approx(99.01)
    assert a.prompt_tokens_mean == pytest.approx(10 + 49.5) and a.completion_tokens_mean == 4
    assert costs["m"]["b"] == CohortCost(1, 5.0, 5.0, 7.0, 3.0)
    assert costs["empty"] == {}
    with pytest.raises(AttributeError):
        a.rows = 3  # type: ignore[misc]
    assert math.isnan(cohort_cost([]).latency_p50_ms)


def test_tolerated_drop_is_an_established_drop_within_max_drop_that_was_not_rejected():
    promoted_drop = _decision("c", "promote", (-0.09, -0.06, -0.02), 0.93, "m")
    assert promoted_drop.tolerated_drop
    assert not _decision("policy_refusal", "hold", (-0.09, -0.06, -0.02), 0.93, "s").tolerated_drop  # max_drop 0.05
    assert _decision("c", "hold", (-0.09, -0.06, -0.02), 0.8, "s").tolerated_drop
    assert not _decision("c", "promote", (-0.02, 0.0, 0.02), 1.0, "m").tolerated_drop  # zero in the interval
    assert not _decision("c", "reject", (-0.3, -0.2, -0.11), 0.7, "s").tolerated_drop


def test_report_says_what_ships_first_and_marks_tolerated_drops(tmp_path):
    gate = _gate()
    written = write_reports(tmp_path, gate, _plan(gate), title="gate", policy=POLICY, costs=_costs(gate))
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.html", "rollout.yaml", "forest.png",
                                                     "chart.png"}
    page = written["html"].read_text()
    assert page.index('id="what-ships"') < page.index('id="intervals"') < page.index('id="models"')
    ships = page[page.index('id="what-ships"'):page.index('id="intervals"')]
    assert "default (no cohort)" in ships and "10% to " + CANDIDATE in ships and "specialist → base" in ships
    assert "2 of 4 cohort(s)" in ships
    assert ships.count(TOLERATED_DROP) == 1 and page.count(f"PROMOTE · {TOLERATED_DROP}") == 1
    assert page.count("data:image/png;base64,") == 2 and "<details>" in page and "@media print" in page
    assert "latency p99 ms" in page and ">388.9<" in page  # p99 of 10, 20, 30, 400 ms

    md = written["md"].read_text()
    assert md.index("## What ships") < md.index("## Intervals") and "![paired differences" in md
    assert f"PROMOTE ({TOLERATED_DROP})" in md and "| out_of_domain | 40 |" in md
    assert "| policy_refusal | 40 |" in md and "| -0.050 |" in md  # policy_refusal's own max_drop


def test_report_without_policy_or_costs_still_renders(tmp_path):
    gate = _gate()
    written = write_reports(tmp_path, gate, _plan(gate), title="gate")
    page = written["html"].read_text()
    assert "What ships" in page and "latency" not in page and page.count("data:image/png") == 2


def _cost_lines(md: str, cohort: str) -> dict[str, str]:
    """model → its row of the report's cost table on `cohort`."""
    table = md[md.index("## Scores, latency and tokens per model"):]
    lines = [line for line in table.splitlines() if line.startswith(f"| {cohort} | ")]
    return {line.split(" | ")[1].removesuffix(" (serves)"): line for line in lines}


def test_a_report_says_when_each_latency_was_measured_and_never_compares_runs_apart(family, tmp_path):
    """Two gates on one registry, one command each: the second reads the base and the source from the cache
    (measured days earlier, as the backdated rows say) and measures only its candidate. Its report shows each
    model's measurement time (the earlier date for the cached ones) and marks the latencies as not comparable."""
    import datetime
    import sqlite3

    from mergegate.model_ref import ModelRef
    from mergegate.pipeline import gate_release

    suite = tmp_path / "suite.jsonl"
    suite.write_text("\n".join(json.dumps({"id": f"{c}{i}", "cohort": c, "prompt": f"{c} {i}:", "expected": "{}",
                                            "evaluators": ["json_valid"]}) for c in ("a", "b") for i in range(3)))
    registry = tmp_path / "registry.sqlite"
    base, source = ModelRef("base", family["base"]), ModelRef("ft2", family["ft2"])
    first = gate_release(ModelRef("ft1", family["ft1"]), base, [source], suite, None, tmp_path / "first",
                         eval=EvalOptions(progress=False, max_new_tokens=4), registry=registry)
    md = first.reports["md"].read_text()
    assert "latency measured" in md and "†" not in md  # measured together: comparable
    with sqlite3.connect(registry) as db:  # the earlier command ran three days ago
        db.execute("UPDATE row_results SET measured = measured - 3 * 86400")
        earlier = dict(db.execute("SELECT model_name, MIN(measured) FROM row_results GROUP BY model_name"))
    db.close()

    second = gate_release(ModelRef("ft3", family["ft3"]), base, [source], suite, None, tmp_path / "second",
                          eval=EvalOptions(progress=False, max_new_tokens=4), registry=registry)
    assert second.runs["base"].cached and not second.runs["ft3"].cached
    md = second.reports["md"].read_text()
    day = {name: datetime.datetime.fromtimestamp(earlier[name], tz=datetime.timezone.utc).strftime("%Y-%m-%d")
           for name in ("base", "ft2")}
    for cohort in ("a", "b"):
        rows = _cost_lines(md, cohort)
        assert set(rows) == {"ft3", "base", "ft2"}
        for name in ("base", "ft2"):
            assert f"{day[name]} " in rows[name] and " UTC" in rows[name]
            assert day[name] not in rows["ft3"]
        assert all(line.count("†") == 2 for line in rows.values())  # p50 and p99 marked on every model
    assert "Latencies on a, b were not all measured in one run" in md and "not comparable" in md
    page = second.reports["html"].read_text()
    assert "latency measured" in page and "not all measured in one run" in page


def test_latencies_measured_by_one_session_are_comparable_and_unknown_times_are_not(tmp_path):
    from mergegate.registry import Measurement

    gate = _gate()
    when = 1_700_000_000.0  # 2023-11-14 22:13 UTC
    together = {name: {d.cohort: Measurement(4, frozenset({"s1"}), when, when + 30, cached=name != CANDIDATE)
                       for d in gate.decisions} for name in gate.aggregate}
    md = write_reports(tmp_path, gate, _plan(gate), title="gate", costs=_costs(gate), measured=together)["md"].read_text()
    assert "2023-11-14 22:13 UTC" in md and "†" not in md and "not all measured" not in md
    # a model whose rows on one cohort have no measurement time (stored by an older mergegate) is not comparable
    together["base"]["tool_required"] = Measurement(4, frozenset(), None, None, undated=4, cached=True)
    md = write_reports(tmp_path, gate, _plan(gate), title="gate", costs=_costs(gate), measured=together)["md"].read_text()
    assert "unknown (stored before measurement times were kept)" in _cost_lines(md, "tool_required")["base"]
    assert "Latencies on tool_required were not all measured in one run" in md
    assert all("†" in line for line in _cost_lines(md, "tool_required").values())
    assert not any("†" in line for line in _cost_lines(md, "json_output").values())


def test_report_refuses_a_policy_the_gate_did_not_apply(tmp_path):
    gate = _gate()
    with pytest.raises(MergegateError, match="not the one the gate applied"):
        write_reports(tmp_path, gate, _plan(gate), title="gate", policy=Policy())


def test_report_says_what_changed_against_the_served_plan(tmp_path):
    gate = _gate()
    plan = _plan(gate)
    current = plan.model_copy(deep=True)
    current.routes["json_output"] = Route(model="specialist", fallback=["base"], mirror=0.1, decision="hold")
    del current.routes["out_of_domain"]
    current.routes["legacy"] = Route(model="base")
    current.default = Route(model="base")
    changes = plan_changes(current, plan)
    assert changes["json_output"] == (f"model specialist → {CANDIDATE}; fallback base → specialist → base; "
                                      "mirror 10% → 0%")
    assert changes["out_of_domain"] == "new cohort" and changes["tool_required"] == "unchanged"
    assert changes["legacy"].startswith("removed") and changes["default"].startswith(f"model base → {CANDIDATE}")
    current_file = tmp_path / "served" / "rollout.yaml"
    current_file.parent.mkdir()
    current.save(current_file)
    for name in current.models:
        (tmp_path / "models" / name).mkdir(parents=True, exist_ok=True)
    current.models = {name: PlanModel(role=m.role, path=str(tmp_path / "models" / name))
                      for name, m in current.models.items()}
    current.save(current_file)  # loadable: load_plan checks every model folder exists
    written = write_reports(tmp_path / "out", gate, plan, title="gate", policy=POLICY, current=current_file)
    page = written["html"].read_text()
    assert "vs current" in page and "new cohort" in page and "legacy" in page
    assert "vs current" in written["md"].read_text()


def test_release_rank_counts_promotions_then_the_worst_cohort_never_a_mean():
    gate = _gate()
    assert release_rank(gate) == (2, 0.7)
    # a higher aggregate mean and a better average retention do not beat a better worst cohort
    even = GateResult("b", [_decision(c, "promote" if i < 2 else "hold", (-0.01, 0.0, 0.01), 0.8, "b")
                            for i, c in enumerate(["w", "x", "y", "z"])], {"b": 0.1}, "0")
    assert release_rank(even) == (2, 0.8) and release_rank(even) > release_rank(gate)
    three = GateResult("c", [_decision(c, "promote", (-0.01, 0.0, 0.01), 0.5, "c") for c in "xyz"], {"c": 0.0}, "0")
    assert release_rank(three) > release_rank(even)  # promotions first


# ---- the page in a browser -------------------------------------------------------------------------------------

# Written into the page: the layout measured once everything has loaded, as JSON in an element --dump-dom prints.
MEASURE = """<script>
addEventListener('load', () => {
  const width = window.innerWidth;
  const outside = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('.scroll')) continue;  // a wide table may scroll inside its own box
    if (el.getBoundingClientRect().right > width + 1) outside.push(el.tagName + '.' + el.className);
  }
  const ships = document.querySelector('#what-ships table').getBoundingClientRect();
  const result = {
    width, page_overflows: document.documentElement.scrollWidth > width, outside,
    scrolling_boxes: [...document.querySelectorAll('.scroll')].filter(b => b.scrollWidth > b.clientWidth).length,
    pngs: [...document.images].filter(i => i.src.startsWith('data:image/png') && i.naturalWidth > 0).length,
    ships_bottom: ships.bottom, height: window.innerHeight,
  };
  const out = document.createElement('div');
  out.id = 'layout-result';
  out.hidden = true;
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _layout(page: str, tmp_path, width: int, height: int = 900) -> dict:
    measured = tmp_path / f"measured-{width}.html"
    measured.write_text(page.replace("</body>", MEASURE + "</body>"))
    done = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", f"--window-size={width},{height}", "--virtual-time-budget=5000",
                           "--dump-dom", measured.as_uri()], capture_output=True, text=True, timeout=60)
    found = re.search(r'<div id="layout-result" hidden="">(.*?)</div>', done.stdout)
    assert found, done.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make test installs it "
                    "with apt-get when run as root)")
def test_page_fits_wide_and_narrow_windows_in_chromium(tmp_path):
    gate = _gate()
    page = write_reports(tmp_path, gate, _plan(gate), title=f"mergegate release: {CANDIDATE}", policy=POLICY,
                         costs=_costs(gate))["html"].read_text()
    wide = _layout(page, tmp_path, 1400)
    assert wide["width"] == 1400 and not wide["page_overflows"] and wide["outside"] == []
    assert wide["scrolling_boxes"] == 0  # at 1400 px every table fits as it is
    assert wide["pngs"] == 2
    assert wide["ships_bottom"] <= wide["height"]  # what ships is on the first screen
    narrow = _layout(page, tmp_path, 600)
    assert narrow["width"] == 600 and not narrow["page_overflows"] and narrow["outside"] == [], narrow
    assert narrow["pngs"] == 2
