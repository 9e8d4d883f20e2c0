"""Progress bars: the one place that decides whether a bar is shown and how it looks.

Merging, calibration and evaluation all report through `Progress`: on a terminal (stderr is a TTY) a rich
bar per task, elsewhere callbacks that do nothing, so pipes, CI logs and tests stay clean.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

Advance = Callable[[int], None]


def _ignore(amount: int) -> None:
    return None


class Progress:
    """Rich bars on stderr when `show` (default: stderr is a terminal); otherwise every call is a no-op.

    Use as a context manager; `task` adds a bar and returns the callback that advances it.
    `unit="bytes"` shows sizes and a transfer rate instead of "done/total".
    """

    def __init__(self, show: bool | None = None):
        self.shown = sys.stderr.isatty() if show is None else show
        self._rich: Any = None
        if self.shown:
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(console=Console(stderr=True), transient=False)

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def task(self, label: str, total: int, *, completed: int = 0, unit: str = "items") -> Advance:
        """Add a bar; returns `advance(n)`. The bar's columns follow `unit` ("bytes", or a count's noun)."""
        if self._rich is None:
            return _ignore
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if unit == "bytes":
            self._rich.columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn())
        else:
            self._rich.columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn(unit), TimeRemainingColumn())
        task_id = self._rich.add_task(label, total=total, completed=completed)
        rich = self._rich

        def advance(amount: int) -> None:
            rich.update(task_id, advance=amount)

        return advance
