"""Exporting a released model to the formats people deploy (GGUF for llama.cpp: `mergegate.export.gguf`)."""

from .gguf import GGUF_TYPES, GGUFExportError, GGUFExport, export_gguf

__all__ = ["GGUF_TYPES", "GGUFExport", "GGUFExportError", "export_gguf"]
