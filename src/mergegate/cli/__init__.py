"""The command line: a thin typer shell over the Python API. Nothing in the core imports it."""

from .compare import register as _register_compare
from .export import register as _register_export
from .live import register as _register_live
from .lora import register as _register_lora
from .main import app, main
from .moe import register as _register_moe
from .search import register as _register_search
from .serve import register as _register_serve

_register_compare(app)
_register_export(app)
_register_live(app)
_register_lora(app)
_register_moe(app)
_register_search(app)
_register_serve(app)

__all__ = ["app", "main"]
