"""Outputs written through a staging folder (file) get the permissions the user's umask gives any new folder and
file, not the private 0700/0600 of a temporary one: others on the machine can read a merged model when the umask
lets them."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from mergegate import merge
from mergegate._staging import staged, staged_file

from .helpers import recipe_for


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): _mode(path) for path in folder.rglob("*")}


def test_a_staged_folder_and_everything_in_it_follow_the_umask(tmp_path, umask):
    out = tmp_path / "out"
    with staged(out) as staging:
        (staging / "config.json").write_text("{}")
        fd, _ = tempfile.mkstemp(dir=staging, prefix="shard-")  # private (0600), as temporary files are
        os.close(fd)
        Path(tempfile.mkdtemp(dir=staging, prefix="sub-")).joinpath("weights.bin").write_bytes(b"x")
    assert _mode(out) == 0o777 & ~umask
    modes = _modes(out)
    assert len(modes) == 4
    for name, mode in modes.items():
        expected = 0o777 & ~umask if (out / name).is_dir() else 0o666 & ~umask
        assert mode == expected, (name, oct(mode), oct(expected))


def test_a_merged_model_is_readable_by_others_under_umask_022(family, tmp_path):
    before = os.umask(0o022)
    try:
        merge(recipe_for("linear", family, base=False), tmp_path / "merged", progress=False)
    finally:
        os.umask(before)
    assert _mode(tmp_path / "merged") == 0o755
    modes = _modes(tmp_path / "merged")
    assert modes and set(modes.values()) == {0o644}, modes


def test_a_staged_file_follows_the_umask(tmp_path, umask):
    out = tmp_path / "model.gguf"
    with staged_file(out) as partial:
        partial.write_bytes(b"GGUF")
    assert _mode(out) == 0o666 & ~umask
