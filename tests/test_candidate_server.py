"""The candidate's launched server (`mergegate.candidate_server`): a template's placeholders become whole arguments
whatever the folder is named, and a server that never becomes ready is refused with its whole process group ended."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from mergegate.candidate_server import candidate_command, served_candidate
from mergegate.errors import CandidateServerError

HOSTILE_NAME = "x 'y\" --trust-remote-code;touch PWNED {port} $(id)"


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "d" / HOSTILE_NAME
    folder.mkdir(parents=True)
    return folder


def test_a_placeholder_is_one_argument_whatever_the_folder_is_named(tmp_path):
    folder = _folder(tmp_path)
    argv = candidate_command("vllm serve {path} --port {port} --served-model-name={name}", folder, 8000, "a b;c")
    assert argv == ["vllm", "serve", str(folder), "--port", "8000", "--served-model-name=a b;c"]


def test_the_launched_server_sees_the_folder_as_exactly_one_argument(tmp_path):
    folder = _folder(tmp_path)
    seen = tmp_path / "argv.json"
    script = tmp_path / "server.py"  # records its arguments and exits: refused as "exited before it was ready"
    script.write_text(f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    template = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} serve {{path}} --port {{port}}"
    with pytest.raises(CandidateServerError, match="exited with code 3"):
        with served_candidate(template, folder, "cand", tmp_path / "server.log", timeout_s=60):
            pass
    argv = json.loads(seen.read_text())
    assert argv[:2] == ["serve", str(folder)] and argv[2] == "--port" and argv[3].isdigit() and len(argv) == 4
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
