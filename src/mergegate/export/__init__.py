"""Exporting a released model to the formats people deploy (GGUF for llama.cpp: `mergegate.export.gguf`), and
the way back: a GGUF file as a model folder (`mergegate.export.gguf_import`)."""

from ..errors import GGUFExportError, GGUFImportError
from .gguf import GGUF_TYPES, GGUFExport, export_gguf
from .gguf_import import ImportedGGUF, import_gguf

__all__ = ["GGUF_TYPES", "GGUFExport", "GGUFExportError", "GGUFImportError", "ImportedGGUF", "export_gguf",
           "import_gguf"]
