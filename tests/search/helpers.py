"""Plain helpers the search tests share (the `suites` fixture lives in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
COHORTS = ("tool_required", "json_output")
POLICY = {"default": {"min_rows": 3, "min_score": 0.0, "max_drop": 0.5, "min_retention": 0.5}}


def space(tmp_path: Path, dtype: str = "float32") -> Path:
    models = DEMO / "models"
    text = {
        "merge_method": "task_arithmetic", "base_model": str(models / "base"),
        "models": [{"model": str(models / "tool_required"), "parameters": {"weight": {"range": [0.3, 1.2]}}},
                   {"model": str(models / "json_output"), "parameters": {"weight": {"range": [0.3, 1.2]}}}],
        "parameters": {"lambda": {"range": [0.5, 1.0]}}, "dtype": dtype,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path
