"""One release pipeline: the search's trials run its steps (merge the candidate, evaluate it as it is or through its
own server) instead of a chain of their own, and only the pipeline starts a candidate's server."""

from __future__ import annotations

import ast
from pathlib import Path

import mergegate

SRC = Path(mergegate.__file__).parent


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    return names


def test_only_the_pipeline_serves_a_candidate_for_its_evaluation():
    serving = {path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py")
               if "served_candidate" in _names_used(path) and "def served_candidate" not in path.read_text()}
    assert serving == {"pipeline.py"}


def test_a_search_trial_runs_the_pipelines_steps():
    trial = SRC / "search" / "trial.py"
    assert {"merge_candidate", "evaluated_candidate", "evaluate_by_cohort", "for_cohorts"} <= _names_used(trial)
    tree = ast.parse(trial.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not {"merge", "served_candidate", "run_config"} & imported and "policy_for" not in defined
