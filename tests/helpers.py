"""Plain helpers the tests share (fixtures live in conftest.py, which pytest injects by name)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """Rows as a JSONL suite file (one JSON object a line); returns the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe_for(method: str, family: dict[str, Path], models=("ft1", "ft2", "ft3"), base=True, **parameters) -> dict:
    weights = parameters.pop("weights", [1.0] * len(models))
    recipe = {
        "merge_method": method,
        "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in zip(models, weights)],
    }
    if base:
        recipe["base_model"] = str(family["base"])
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def assert_refused(result, *fragments: str) -> None:
    """A refusal as a user sees it: exit 2, exactly one `mergegate: ...` line on stderr naming each fragment, no
    traceback. `result` is a typer CliRunner result or a finished subprocess."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + (getattr(result, "output", "") or "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergegate: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
