"""The real `mergegate` executable: exit 0 on success, 2 with the reason on stderr when refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import recipe_for

MERGEGATE = str(Path(sys.executable).with_name("mergegate"))


def _run(*args):
    return subprocess.run([MERGEGATE, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_merge_command_succeeds(family, tmp_path, write_recipe):
    recipe = write_recipe(recipe_for("dare_ties", family, density=0.7))
    done = _run("merge", recipe, tmp_path / "out", "--quiet", "--seed", "5", "--shard-size", "200KB")
    assert done.returncode == 0, done.stderr
    assert "merged 21 tensors" in done.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_refused_input_exits_2_with_reason_and_writes_nothing(family, tmp_path, write_recipe):
    recipe = recipe_for("ties", family)
    recipe["models"][0]["model"] = str(tmp_path / "nowhere")
    done = _run("merge", write_recipe(recipe), tmp_path / "out")
    assert done.returncode == 2
    assert "nowhere': no such folder" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_recipe_exits_2_naming_the_key(family, tmp_path, write_recipe):
    recipe = recipe_for("ties", family)
    recipe["parameters"] = {"lamda": 0.5}
    done = _run("merge", write_recipe(recipe), tmp_path / "out")
    assert done.returncode == 2 and "unknown parameter 'lamda' for ties" in done.stderr


def test_bad_shard_size_exits_2(family, tmp_path, write_recipe):
    done = _run("merge", write_recipe(recipe_for("linear", family, base=False)), tmp_path / "o", "--shard-size", "big")
    assert done.returncode == 2 and "not a size: 'big'" in done.stderr


def test_methods_command_lists_parameters():
    done = _run("methods")
    assert done.returncode == 0
    assert "ties" in done.stdout and "density[per model]=1.0" in done.stdout and "lambda=1.0" in done.stdout
