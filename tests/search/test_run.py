"""The search end to end on the demo models and a local Ray with 2 CPUs: trials scored as the gate scores a
release, a refused recipe recorded as a failed trial, the best kept and released on held-out rows, the report and
a best.yaml that `mergegate merge` runs; and the objective's order (cohorts promoted, then the worst retention)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import yaml

from mergegate.errors import SearchError
from mergegate.evaluate import load_suite
from mergegate.gate import decide, load_policy
from mergegate.pipeline import ServeCommand
from mergegate.registry import Registry, RowResult
from mergegate.search import SearchOptions, load_space, objective_values, search
from mergegate.search.trial import TrialSpec, run_trial

from .helpers import COHORTS, DEMO, POLICY, space

pytestmark = pytest.mark.slow


def test_a_search_scores_trials_like_the_gate_and_releases_the_best_on_held_out_rows(tmp_path, suites, local_ray,
                                                                                    monkeypatch):
    dev, held = suites
    out = tmp_path / "out"
    result = search(space(tmp_path), dev, held, POLICY, out, trials=3, parallel=2, keep=2, batch_size=8,
                    max_new_tokens=24, progress=False)
    assert [t.status for t in result.trials] == ["complete"] * 3
    registry = Registry(out / "registry.sqlite")
    for record in result.trials:
        # the trial's score is the gate's decision on its rows, recomputed here from the registry
        rows = _trial_rows(registry, record.number, load_suite(dev).sha256)
        assert len(rows) == 8
        gate = decide({"candidate": rows, **{n: r.results for n, r in result.dev_runs.items()}}, candidate="candidate",
                      base="base", sources=["tool_required", "json_output"], policy=load_policy(POLICY))
        assert {d.cohort: d.decision for d in gate.decisions} == record.decisions
        assert record.promoted == sum(d.decision == "promote" for d in gate.decisions)
    registry.close()
    # the best two kept (folders on disk), the other deleted; both released on the held-out rows
    assert [h.trial.number for h in result.held_out] == [t.number for t in result.best]
    assert len(result.best) == 2 and all(t.folder is not None and t.folder.is_dir() for t in result.best)
    kept = sorted(p.name for p in (out / "trials").iterdir() if p.is_dir())
    assert kept == sorted(f"trial-{t.number:04d}" for t in result.best)
    assert result.best[0].rank >= result.best[1].rank
    for held_release in result.held_out:
        assert {d.cohort for d in held_release.release.gate.decisions} == set(COHORTS)
        assert (held_release.release.out / "report.md").is_file()
    text = (out / "search.md").read_text()
    assert "Dev vs held-out" in text and f"trial {result.best[0].number}" in text
    assert (out / "search.html").is_file() and (out / "rollout.yaml").is_file()
    # best.yaml is the best trial's recipe as plain YAML (no search syntax left), relative to OUT, and merges
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "range" not in (out / "best.yaml").read_text()
    assert not Path(best["base_model"]).is_absolute()
    from mergegate.engine import merge

    merged = merge(out / "best.yaml", tmp_path / "from-best")
    assert merged.tensors > 0
    # mergekit runs it too (from the search's folder: mergekit reads relative paths from the working folder)
    # and gives the same tensors
    from ..mergekit_peer import read_tensors, run_mergekit

    monkeypatch.chdir(out)
    run_mergekit(best, tmp_path / "mergekit-best")
    ours, theirs = read_tensors(tmp_path / "from-best"), read_tensors(tmp_path / "mergekit-best")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5, name


def _trial_rows(registry: Registry, number: int, suite_hash: str) -> list[RowResult]:
    """The trial's dev rows as the search recorded them in the registry (one finished run of its merged model)."""
    with sqlite3.connect(registry.path) as db:
        (run_id,), = db.execute("SELECT r.id FROM eval_runs r JOIN models m ON m.hash = r.model_hash "
                                "WHERE m.name=? AND r.suite_hash=? AND r.status='finished'",
                                (f"trial-{number}", suite_hash)).fetchall()
    return registry.results(run_id, "candidate")


def test_a_refused_recipe_is_a_failed_trial_with_its_reason_and_the_search_goes_on(tmp_path, suites, local_ray):
    dev, held = suites
    path = space(tmp_path)
    text = yaml.safe_load(path.read_text())
    # lambda × weight × delta: 3e38 × 1e-38 is a weight of 3; 3e38 × 3e38 overflows float32, and the merge
    # refuses to write a tensor that came out non-finite from finite inputs
    text["parameters"]["lambda"] = 3.0e38
    text["models"][0]["parameters"]["weight"] = {"choice": [1.0e-38, 3.0e38]}
    text["models"][1]["parameters"]["weight"] = 1.0e-38
    path.write_text(yaml.safe_dump(text))
    result = search(path, dev, held, POLICY, tmp_path / "out", trials=4, parallel=2, keep=1, seed=0, sampler="random",
                    batch_size=8, max_new_tokens=24, progress=False)
    statuses = [t.status for t in result.trials]
    assert len(statuses) == 4 and "failed" in statuses and "complete" in statuses
    failed = [t for t in result.trials if t.status == "failed"]
    for record in failed:  # each failure names what was refused
        assert record.reason and ("non-finite" in record.reason or "inf" in record.reason), record.reason
        assert record.params["models[0].parameters.weight"] == 3.0e38
    assert "failed" in (tmp_path / "out" / "search.md").read_text()


def test_a_trial_that_crashes_is_an_outcome_naming_the_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    spec = TrialSpec(number=7, recipe_yaml=(DEMO / "recipes" / "ties.yaml").read_text(),
                     recipe_folder=str(DEMO / "recipes"), folder=str(blocker / "trial"), dev_suite=None,
                     candidate="candidate", base="base", sources=(), source_results={}, policy=None)
    outcome = run_trial(spec)
    assert outcome.number == 7 and outcome.status == "failed"
    assert outcome.reason and str(blocker) in outcome.reason


def test_overlapping_dev_and_held_out_rows_are_refused(tmp_path, suites):
    dev, _ = suites
    with pytest.raises(SearchError, match="share"):
        search(space(tmp_path), dev, dev, POLICY, tmp_path / "out", trials=1)


def test_a_study_folder_of_another_search_is_refused(tmp_path, suites, local_ray):
    dev, held = suites
    out = tmp_path / "out"
    search(space(tmp_path), dev, held, POLICY, out, trials=1, keep=1, batch_size=8, max_new_tokens=24, progress=False)
    with pytest.raises(SearchError, match="another seed"):
        search(space(tmp_path), dev, held, POLICY, out, trials=1, seed=5, batch_size=8, max_new_tokens=24)


def _gate(scores: dict[str, dict[str, list[float]]]):
    """A gate result from per-model, per-cohort row scores (rows paired by position)."""
    results = {model: [RowResult(f"{cohort}-{i}", cohort, model, model, "", 1, 1, 1.0, s, s >= 0.5, {})
                       for cohort, values in by_cohort.items() for i, s in enumerate(values)]
               for model, by_cohort in scores.items()}
    policy = load_policy({"default": {"min_rows": 3, "max_drop": 0.1, "min_retention": 0.85, "min_score": 0.0},
                          "bootstrap": 200})
    return decide(results, candidate="candidate", base="base", sources=["a", "b"], policy=policy)


def test_the_objective_ranks_cohorts_kept_above_a_better_mean():
    n = 20
    sources = {"base": {"x": [0.0] * n, "y": [0.0] * n}, "a": {"x": [1.0] * n, "y": [0.0] * n},
               "b": {"x": [0.0] * n, "y": [1.0] * n}}
    keeps_both = _gate({**sources, "candidate": {"x": [1.0] * n, "y": [1.0] * n}})
    trades_one = _gate({**sources, "candidate": {"x": [1.0] * n, "y": [0.5] * n}})
    drops_one = _gate({**sources, "candidate": {"x": [1.0] * n, "y": [0.0] * n}})
    assert [[d.decision for d in g.decisions] for g in (keeps_both, trades_one, drops_one)] == [
        ["promote", "promote"], ["promote", "reject"], ["promote", "reject"]]
    gate = [objective_values(g, "gate", ["x", "y"])[0] for g in (keeps_both, trades_one, drops_one)]
    assert gate[0] > gate[1] > gate[2]  # 2 promoted > 1 promoted keeping half of y > 1 promoted keeping nothing
    assert objective_values(keeps_both, "mean", ["x", "y"])[0] == pytest.approx(1.0)
    assert objective_values(trades_one, "pareto", ["x", "y"]) == [1.0, pytest.approx(0.5)]
    # the mean prefers a lopsided candidate (x far above its best source, y 40% down) to one that keeps both
    lopsided = _gate({"base": {"x": [0.0] * n, "y": [0.0] * n}, "a": {"x": [0.5] * n, "y": [0.0] * n},
                      "b": {"x": [0.0] * n, "y": [1.0] * n}, "candidate": {"x": [1.0] * n, "y": [0.6] * n}})
    balanced = _gate({"base": {"x": [0.0] * n, "y": [0.0] * n}, "a": {"x": [0.5] * n, "y": [0.0] * n},
                      "b": {"x": [0.0] * n, "y": [1.0] * n}, "candidate": {"x": [0.48] * n, "y": [0.98] * n}})
    mean = [objective_values(g, "mean", ["x", "y"])[0] for g in (lopsided, balanced)]
    gated = [objective_values(g, "gate", ["x", "y"])[0] for g in (lopsided, balanced)]
    assert mean[0] > mean[1]  # the mean prefers gaining on x while losing 40% of y...
    assert gated[1] > gated[0]  # ...the gate objective prefers keeping both cohorts


def test_search_options_are_checked_before_anything_runs(tmp_path, suites):
    dev, held = suites
    with pytest.raises(SearchError) as caught:
        search(space(tmp_path), dev, held, POLICY, tmp_path / "out", SearchOptions(trials=0, parallel=0,
                                                                                      objective="median"))  # type: ignore[arg-type]
    assert "trials must be" in str(caught.value) and "parallel must be" in str(caught.value)
    assert "objective must be" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_space_loads_the_shipped_demo_space():
    loaded = load_space(DEMO / "search" / "space.yaml")
    assert loaded.methods == ["task_arithmetic", "ties", "dare_ties"]
    assert optuna is not None


@pytest.mark.parametrize("objective, sampler", [("pareto", None), ("gate", "cmaes"), ("mean", "tpe")])
def test_each_objective_and_sampler_runs_trials(tmp_path, suites, local_ray, objective, sampler):
    dev, held = suites
    result = search(space(tmp_path), dev, held, POLICY, tmp_path / "out", trials=2, parallel=2, keep=1,
                    objective=objective, sampler=sampler, batch_size=8, max_new_tokens=24, progress=False)
    assert [t.status for t in result.trials] == ["complete", "complete"]
    study = optuna.load_study(study_name="mergegate-search", storage=f"sqlite:///{tmp_path / 'out' / 'study.sqlite'}")
    values = [t.values for t in study.trials]
    if objective == "pareto":  # one value per cohort: its retention
        assert [len(v) for v in values] == [len(COHORTS)] * 2
        assert values[0] == [result.trials[0].retention[c] for c in COHORTS]
    elif objective == "mean":
        assert values[0] == [pytest.approx(result.trials[0].mean_score)]
    else:
        assert values[0][0] == pytest.approx(result.trials[0].promoted + 0.999 * min(1.0, result.trials[0].worst_retention))
    assert len(result.held_out) == 1


def test_trials_evaluate_through_a_server_started_from_the_launch_template(tmp_path, suites, local_ray):
    import sys

    dev, held = suites
    mergegate = Path(sys.executable).with_name("mergegate")
    template = f"{mergegate} serve-folder {{path}} --port {{port}} --served-model-name {{name}} --device cpu"
    result = search(space(tmp_path), dev, held, POLICY, tmp_path / "out", trials=1, keep=1,
                    serve=ServeCommand(template, timeout_s=180), max_new_tokens=24, progress=False)
    assert [t.status for t in result.trials] == ["complete"], result.trials[0].reason
    log = tmp_path / "out" / "trials" / "trial-0000-server.log"
    assert log.is_file() and "serve-folder" in log.read_text()  # the trial's own server, its log kept
    registry = Registry(tmp_path / "out" / "registry.sqlite")
    served = registry._read("SELECT path FROM models WHERE name='trial-0'")
    assert served and served[0]["path"].endswith("trial-0000")


def test_a_bad_launch_template_is_refused_before_any_trial(tmp_path, suites):
    dev, held = suites
    with pytest.raises(Exception, match=r"\{path\}, \{port\} and \{name\}"):
        search(space(tmp_path), dev, held, POLICY, tmp_path / "out", trials=1,
               serve=ServeCommand("vllm serve {path} --port {prot}"))
    assert not (tmp_path / "out" / "study.sqlite").exists()
