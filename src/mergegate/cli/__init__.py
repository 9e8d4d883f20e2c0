"""The command line: a thin typer shell over the Python API. Nothing in the core imports it."""

from .main import app, main
from .serve import register as _register_serve

_register_serve(app)

__all__ = ["app", "main"]
