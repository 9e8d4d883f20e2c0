"""Exporting a released model to the formats people deploy (GGUF for llama.cpp: `mergegate.export.gguf`)."""

from ..errors import GGUFExportError
from .gguf import GGUF_TYPES, GGUFExport, export_gguf

__all__ = ["GGUF_TYPES", "GGUFExport", "GGUFExportError", "export_gguf"]
