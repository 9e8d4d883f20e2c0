"""Files copied from a source folder into a merged model: only regular files that live inside that folder.

A tokenizer side file (or config, generation config) that is a link leaving the model folder must not
smuggle the file it points to into the output (a tester got /etc/passwd inside a merged model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mergegate import CheckpointError, merge

SECRET = "root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "passwd"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _copy(family, tmp_path, name="ft1") -> Path:
    folder = tmp_path / f"{name}-copy"
    shutil.copytree(family[name], folder)
    return folder


def _linear(first: Path, family, **extra) -> dict:
    recipe = {"merge_method": "linear", "models": [{"model": str(first), "parameters": {"weight": 1.0}},
                                                   {"model": str(family["ft2"]), "parameters": {"weight": 1.0}}]}
    recipe.update(extra)
    return recipe


def _no_secret_in(folder: Path) -> None:
    for path in folder.rglob("*") if folder.exists() else []:
        assert not path.is_symlink(), path
        if path.is_file():
            assert SECRET not in path.read_bytes().decode("utf-8", "replace"), path


@pytest.mark.parametrize("name", ["merges.txt", "chat_template.jinja", "tokenizer.json", "special_tokens_map.json",
                                  "generation_config.json"])
def test_side_file_linking_out_of_the_folder_is_refused(family, tmp_path, secret, name):
    source = _copy(family, tmp_path)
    (source / name).unlink(missing_ok=True)
    (source / name).symlink_to(secret)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{name}: links to {secret}, outside the model folder"):
        merge(_linear(source, family), out, progress=False, check_lineage=False)
    assert not out.exists()
    _no_secret_in(tmp_path / "out")


def test_config_linking_out_of_the_folder_is_refused(family, tmp_path):
    source = _copy(family, tmp_path)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((source / "config.json").read_text())
    (source / "config.json").unlink()
    (source / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"config.json: links to {outside}, outside the model folder"):
        merge(_linear(source, family), tmp_path / "out", progress=False)


def test_tokenizer_merge_refuses_links_out_of_any_source(family, tmp_path, secret):
    """With a tokenizer section the output tokenizer is built from the sources' folders and saved anew:
    a link out in any of them is refused before the tokenizer is loaded."""
    source = _copy(family, tmp_path, "ft2")
    (source / "chat_template.jinja").symlink_to(secret)
    recipe = _linear(family["ft1"], family, tokenizer={"source": "union"}, chat_template="auto")
    recipe["models"][1]["model"] = str(source)
    with pytest.raises(CheckpointError, match=rf"chat_template.jinja: links to {secret}"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fifo_is_not_copied(family, tmp_path):
    source = _copy(family, tmp_path)
    os.mkfifo(source / "merges.txt")
    with pytest.raises(CheckpointError, match=r"merges.txt: not a regular file"):
        merge(_linear(source, family), tmp_path / "out", progress=False)


def test_links_inside_the_folder_and_the_hugging_face_cache_layout_are_copied_as_files(family, tmp_path):
    # a link to another file of the same folder
    source = _copy(family, tmp_path)
    (source / "real").mkdir()
    (source / "tokenizer.json").rename(source / "real" / "tokenizer.json")
    (source / "tokenizer.json").symlink_to(Path("real") / "tokenizer.json")
    merge(_linear(source, family), tmp_path / "out", progress=False)
    copied = tmp_path / "out" / "tokenizer.json"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (source / "real" / "tokenizer.json").read_bytes()
    # the Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--ft1"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(family["ft1"].iterdir())):
        shutil.copyfile(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    merge(_linear(snapshot, family, tokenizer={"source": "base"}, chat_template="chatml"), tmp_path / "out2",
          progress=False)
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["model_type"] == "llama"
    assert all(not p.is_symlink() for p in (tmp_path / "out2").iterdir())
