"""A freshly merged candidate behind its own server for the release's evaluation (`release(..., serve=...)`).

The template (e.g. `vllm serve {path} --port {port} --served-model-name {name}`) is split with shlex (no shell),
then each argument is filled in with the candidate's folder, a free loopback port and the candidate's name; the
command starts in its own session with its stdout and stderr in a log file. The server is ready when
`GET http://127.0.0.1:{port}/v1/models` answers 200 and lists the name; its process group is stopped (terminate, then
kill after a grace period) when the `with` block ends, however it ends."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CandidateServerError

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 10.0


def candidate_command(template: str, path: Path, port: int, name: str) -> list[str]:
    """The template's argv for this candidate (CandidateServerError for an unknown placeholder or no command).

    The template is split first and each argument filled in on its own: a folder named `x --trust-remote-code`
    or `d;touch f` stays one argument, and no shell ever reads it."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise CandidateServerError(f"--serve-candidate {template!r}: {exc}") from None
    if not words:
        raise CandidateServerError("--serve-candidate is empty: give the command that serves {path}")
    try:
        return [word.format(path=str(path), port=port, name=name) for word in words]
    except (KeyError, IndexError, ValueError) as exc:
        raise CandidateServerError(f"--serve-candidate {template!r}: {type(exc).__name__}: {exc} (the placeholders "
                                   "are {path}, {port} and {name})") from None


def free_port() -> int:
    """A loopback port nobody listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextmanager
def served_candidate(template: str, path: Path, name: str, log_path: Path, *,
                     timeout_s: float = 600.0) -> Iterator[str]:
    """Start the candidate's server and yield its base URL (`http://127.0.0.1:PORT/v1`) once it lists `name`."""
    port = free_port()
    argv = candidate_command(template, path, port, name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n".encode())
            raise CandidateServerError(f"the candidate's server could not start ({argv[0]}: "
                                       f"{exc.strerror or exc}); see {log_path}") from None
        try:
            url = f"http://{LOOPBACK}:{port}/v1"
            _await_ready(process, url, name, log_path, timeout_s)
            yield url
        finally:
            _stop(process)


def _await_ready(process: subprocess.Popen, url: str, name: str, log_path: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while True:
            code = process.poll()
            if code is not None:
                raise CandidateServerError(f"the candidate's server exited with code {code} before it was ready; "
                                           f"see {log_path}")
            try:
                response = client.get(url + "/models")
                if response.status_code == 200 and any(
                        entry.get("id") == name for entry in response.json().get("data", [])):
                    return
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            if time.monotonic() > deadline:
                raise CandidateServerError(f"the candidate's server did not list '{name}' at {url}/models within "
                                           f"{timeout_s:g} s; see {log_path}")
            time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    """End the server's whole process group (started as its own session): SIGTERM, a grace period for the server to
    stop its workers, then SIGKILL for whatever is left. A server's children (vLLM's workers, holding GPU memory)
    outlive it otherwise, also when the server itself has already exited."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # nothing of the group is left
        pass
