"""`mergegate export-gguf MODEL OUT.gguf --type f16|q8_0|q4_0 [--overwrite]`: a Llama checkpoint as one GGUF file for llama.cpp
(mergegate.export.gguf); `mergegate import-gguf FILE.gguf OUT` the way back (mergegate.export.gguf_import). Wired into the CLI with `register(app)`; torch and `gguf` are imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from .refusal import refuse


def export_gguf_command(
    model: Path = typer.Argument(..., help="Model folder (Hugging Face format, LlamaForCausalLM)."),
    out: Path = typer.Argument(..., help="GGUF file to write (appears only once complete)."),
    qtype: str = typer.Option("f16", "--type", help="f16, q8_0 or q4_0 (matrices; norms stay float32)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists (only once the export succeeded)."),
) -> None:
    """Export MODEL, its tokenizer and chat template to one GGUF file (llama.cpp, Ollama, LM Studio)."""
    from ..errors import MergegateError
    from ..export.gguf import export_gguf

    try:
        result = export_gguf(model, out, qtype, overwrite=overwrite)
    except MergegateError as exc:
        refuse(exc)
    types = sorted({ggml_type for _, ggml_type in result.tensors.values()})
    typer.echo(f"wrote {out} ({qtype}: {len(result.tensors)} tensors as {', '.join(types)}; "
               f"tokenizer '{result.tokenizer_model}', {out.stat().st_size} bytes)")


def import_gguf_command(
    gguf_file: Path = typer.Argument(..., help="GGUF file (llama.cpp's format), quantized or not."),
    out: Path = typer.Argument(..., help="Model folder to write (appears only once complete)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists (only once the import succeeded)."),
) -> None:
    """Write the model in a GGUF file as a Hugging Face folder (float32 safetensors, tokenizer, chat template), so it
    can be a merge's base or source. A quantized file is dequantized: the folder holds the values its blocks decode
    to."""
    from ..errors import MergegateError
    from ..export.gguf_import import import_gguf

    try:
        result = import_gguf(gguf_file, out, overwrite=overwrite)
    except MergegateError as exc:
        refuse(exc)
    types = ", ".join(f"{count} {name}" for name, count in result.tensor_types.items())
    how = "dequantized to float32" if result.dequantized else "float32"
    typer.echo(f"wrote {out} ({result.architecture}, {result.parameters:,} parameters, {how}; source tensors: {types})")


def register(app: typer.Typer) -> None:
    app.command("export-gguf")(export_gguf_command)
    app.command("import-gguf")(import_gguf_command)
