"""`mergegate export-gguf MODEL OUT.gguf --type f16|q8_0|q4_0 [--overwrite]`: a Llama checkpoint as one GGUF file for llama.cpp
(mergegate.export.gguf). Wired into the CLI with `register(app)`; torch and `gguf` are imported only when it runs."""

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


def register(app: typer.Typer) -> None:
    app.command("export-gguf")(export_gguf_command)
