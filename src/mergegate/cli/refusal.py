"""How every command refuses: one line on stderr naming what is wrong, exit status 2, nothing written."""

from __future__ import annotations

from typing import NoReturn

import typer

REFUSED = 2


def refuse(error: Exception) -> NoReturn:
    typer.echo(f"mergegate: {error}", err=True)
    raise typer.Exit(REFUSED)
