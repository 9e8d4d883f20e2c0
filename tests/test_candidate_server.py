"""The candidate's launched server (`mergegate.serving.launcher`): a template's placeholders become whole arguments
whatever the folder is named, and a server that never becomes ready is refused with its whole process group ended."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from mergegate.errors import CandidateServerError
from mergegate.serving.launcher import candidate_command, served_candidate

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


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its new parent to reap it (it holds no memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.slow
def test_a_server_that_never_becomes_ready_is_refused_and_its_children_are_ended(tmp_path):
    """The launched command forks a child that would outlive it (as vLLM's workers do); after the refusal neither
    is running. The child's pid is written by the launched shell right after the fork; an attempt whose deadline
    came before the shell got that far proves nothing, so it is tried again with a longer deadline."""
    child_pid_file = tmp_path / "child.pid"
    template = (f"sh -c 'sleep 300 & echo $! > {shlex.quote(str(child_pid_file))}; sleep 300' "
                "{path} {port} {name}")
    timeout_s = 2.0
    while True:
        with pytest.raises(CandidateServerError, match="did not list 'cand'"):
            with served_candidate(template, tmp_path, "cand", tmp_path / "server.log", timeout_s=timeout_s):
                pass
        if child_pid_file.is_file() and child_pid_file.read_text().strip():
            break
        assert timeout_s < 60, "the launched shell never wrote its child's pid"
        timeout_s *= 2
    child = int(child_pid_file.read_text())
    deadline = time.monotonic() + 60  # only catches "never": the group is signalled before the refusal returns
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), f"the server's child {child} is still running"


@pytest.mark.slow
def test_a_server_that_exits_early_leaves_no_child_behind(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    template = f"sh -c 'sleep 300 & echo $! > {shlex.quote(str(child_pid_file))}; exit 4' {{path}} {{port}}"
    with pytest.raises(CandidateServerError, match="exited with code 4"):
        with served_candidate(template, tmp_path, "cand", tmp_path / "server.log", timeout_s=60):
            pass
    child = int(child_pid_file.read_text())  # written before the shell exited, so before the refusal
    deadline = time.monotonic() + 60
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), f"the server's child {child} is still running"
