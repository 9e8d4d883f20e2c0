"""Plain helpers the CLI tests share: the installed `mergegate` run in a real terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

MERGEGATE = str(Path(sys.executable).with_name("mergegate"))
DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def run_in_terminal(*args, cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Run `mergegate ARGS` with stdin, stdout and stderr on a pseudo-terminal; the exit code and the screen text."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen([MERGEGATE, *map(str, args)], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")
