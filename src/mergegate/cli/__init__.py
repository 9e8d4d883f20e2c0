"""The command line: a thin typer shell over the Python API. Nothing in the core imports it."""

from .main import app, main

__all__ = ["app", "main"]
