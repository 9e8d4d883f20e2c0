"""One launcher for a model server: a command's server in its own process group (`served_candidate`: a freshly
merged candidate behind its own server for the release's evaluation, `release(..., serve=...)`), or an ASGI app in
a thread of this process (`ServerThread`: the demo's gateway, benchmarks, tests). Both bind to 127.0.0.1 only.

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
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import CandidateServerError
from .ready import NotReady, await_ready, lists_model

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
    def gone() -> str | None:
        code = process.poll()
        return None if code is None else f"exited with code {code}"

    try:
        await_ready(lists_model(url, name), timeout_s, gone=gone)
    except NotReady as exc:
        if exc.stopped:
            raise CandidateServerError(f"the candidate's server {exc.stopped} before it was ready; "
                                       f"see {log_path}") from None
        raise CandidateServerError(f"the candidate's server did not list '{name}' at {url}/models within "
                                   f"{timeout_s:g} s; see {log_path}") from None


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


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a daemon thread. Port 0 picks a free port."""

    def __init__(self, app, port: int = 0, *, startup_timeout: float = 120.0, log_level: str = "warning"):
        self.app, self.port, self.startup_timeout, self.log_level = app, port, startup_timeout, log_level
        self.server: Any = None  # a uvicorn.Server once started
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "ServerThread":
        import uvicorn

        config = uvicorn.Config(self.app, host=LOOPBACK, port=self.port, log_level=self.log_level, lifespan="on",
                                access_log=False, timeout_graceful_shutdown=2, timeout_keep_alive=5)
        server = self.server = uvicorn.Server(config)
        thread = self.thread = threading.Thread(target=server.run, name=f"uvicorn-{id(self)}", daemon=True)
        thread.start()
        try:
            await_ready(lambda: bool(server.started), self.startup_timeout, interval_s=0.02,
                        gone=lambda: None if thread.is_alive() else "stopped")
        except NotReady as exc:
            if exc.stopped:
                raise RuntimeError("the server stopped during start-up (see the log above)") from None
            self.stop()
            raise RuntimeError(f"the server did not start within {self.startup_timeout} s") from None
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
