"""The real `mergegate` executable: exit 0 on success, 2 with the reason on stderr when refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import assert_refused, recipe_for

MERGEGATE = str(Path(sys.executable).with_name("mergegate"))
# every test runs the real executable: a fresh interpreter importing torch, about 2 s each
pytestmark = pytest.mark.slow


def _run(*args):
    return subprocess.run([MERGEGATE, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_merge_command_succeeds(family, tmp_path, write_recipe):
    recipe = write_recipe(recipe_for("dare_ties", family, density=0.7))
    done = _run("merge", recipe, tmp_path / "out", "--quiet", "--seed", "5", "--shard-size", "200KB")
    assert done.returncode == 0, done.stderr
    assert "merged 21 tensors" in done.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_merge_says_how_many_tensors_it_wrote_when_large_tensors_merge_in_row_chunks(tmp_path, monkeypatch):
    """A large tensor is merged as several row chunks (one plan job each): the summary counts the tensors the
    model has, not the jobs. The shipped demo's chunks are forced small so its MLP weights are split as a real
    model's embedding is."""
    from safetensors import safe_open
    from typer.testing import CliRunner

    from mergegate.cli import app
    from mergegate.engine import plan as plan_module
    from mergegate.engine.plan import plan_merge

    recipe = Path(__file__).resolve().parents[2] / "examples" / "demo" / "recipes" / "task_arithmetic.yaml"
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 15)
    plan = plan_merge(recipe)
    assert len(plan.jobs) > len(plan.outputs)  # the case in question: more jobs than tensors
    done = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert done.exit_code == 0, done.output
    written = 0
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, "pt") as weights:
            written += len(list(weights.keys()))
    assert written == len(plan.outputs)
    assert f"merged {written} tensors " in done.output


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


# ------------------------------------------------------------------ hostile inputs: exit 2, one line, no traceback




def _broken_copy(family, tmp_path, name="ft1"):
    import shutil

    folder = tmp_path / f"{name}-broken"
    shutil.copytree(family[name], folder)
    return folder


@pytest.mark.parametrize("case", [
    "shard-size-400-digits", "workers-negative", "workers-zero", "pad-1e12", "not-utf8", "not-a-mapping",
    "yaml-does-not-parse", "python-tag", "unsafe-tag", "output-under-a-file", "nan-weight", "inf-lambda",
    "header-is-a-list", "overlapping-tensors", "config-is-a-list", "config-not-utf8", "symlinked-side-file",
])
def test_bad_inputs_exit_2_with_one_line(case, family, tmp_path, write_recipe):
    import json
    import struct

    recipe = recipe_for("ties", family, density=0.5)
    args, expected = [], []
    out = tmp_path / "out"
    if case == "shard-size-400-digits":
        args, expected = ["--shard-size", "9" * 400], ["--shard-size", "too large"]
    elif case == "workers-negative":
        args, expected = ["--workers", "-1"], ["--workers must be a whole number of at least 1, got -1"]
    elif case == "workers-zero":
        args, expected = ["--workers", "0"], ["--workers must be a whole number of at least 1, got 0"]
    elif case == "pad-1e12":
        recipe["tokenizer"] = {"source": "union", "pad_to_multiple_of": 1e12}
        expected = ["tokenizer.pad_to_multiple_of", "less than or equal to 65536"]
    elif case == "nan-weight":
        recipe["models"][0]["parameters"]["weight"] = float("nan")
        expected = ["models[0].parameters.weight: nan is not a finite number"]
    elif case == "inf-lambda":
        recipe["parameters"]["lambda"] = float("inf")
        expected = ["parameters.lambda: inf is not a finite number"]
    elif case == "output-under-a-file":
        (tmp_path / "some_file").write_text("not a folder")
        out = tmp_path / "some_file" / "out"
        expected = ["cannot be created", "some_file is not a folder"]
    elif case in ("header-is-a-list", "overlapping-tensors"):
        broken = _broken_copy(family, tmp_path)
        if case == "header-is-a-list":
            header = b"[1, 2]"
            expected = [f"{broken / 'model.safetensors'}: safetensors header must be a JSON object"]
        else:
            header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
            expected = [f"{broken / 'model.safetensors'}: tensor 'b' byte range [4, 12) overlaps"]
        (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
        recipe["models"][0]["model"] = str(broken)
    elif case in ("config-is-a-list", "config-not-utf8"):
        broken = _broken_copy(family, tmp_path)
        (broken / "config.json").write_bytes(b"[1, 2]" if case == "config-is-a-list" else b'{"a": "\xff"}')
        recipe["models"][0]["model"] = str(broken)
        expected = [f"{broken / 'config.json'}: " + ("expected a JSON object, got a list" if case == "config-is-a-list"
                                                      else "not UTF-8 text")]
    elif case == "symlinked-side-file":
        broken = _broken_copy(family, tmp_path, "base")
        secret = tmp_path / "passwd"
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
        (broken / "chat_template.jinja").symlink_to(secret)
        recipe["base_model"] = str(broken)
        expected = [f"{broken / 'chat_template.jinja'}: links to {secret}, outside the model folder"]
    path = write_recipe(recipe)
    if case == "not-utf8":
        path.write_bytes(path.read_bytes().replace(b"merge_method", b"merge_m\xe9thod"))
        expected = [f"{path}: line 1: not valid UTF-8 (byte 0xe9 at column 8)"]
    elif case == "not-a-mapping":
        path.write_text("- merge_method: ties\n")
        expected = [f"{path}: expected a mapping of recipe keys, got list"]
    elif case == "yaml-does-not-parse":
        path.write_text("merge_method: ties\nmodels: [\n  - {model: a\n")
        expected = [f"{path}: line 3, column 3: not valid YAML (expected the node content"]
    elif case in ("python-tag", "unsafe-tag"):
        tag = "!!python/object/apply:os.system ['touch pwned']" if case == "python-tag" else "!unsafe ties"
        path.write_text(f"merge_method: {tag}\nmodels: [{{model: a}}]\n")
        expected = [f"{path}: line 1, column 15: not valid YAML (could not determine a constructor for the tag"]
    done = _run("merge", path, out, "--quiet", *args)
    assert_refused(done, *expected)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".mergegate-" in p.name] if out.parent.is_dir() else True


def test_merge_command_refuses_recipe_path_that_is_not_a_file(tmp_path):
    done = _run("merge", tmp_path / "recipe.txt", tmp_path / "out")
    assert_refused(done, "recipe.txt: no such file")
