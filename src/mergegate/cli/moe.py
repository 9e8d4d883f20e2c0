"""`mergegate moe CONFIG.yaml OUT`: a Mixtral mixture of experts from a Llama base and dense fine-tunes
(mergegate.moe). Wired into the CLI with `register(app)`; torch is imported only when the command runs."""

from __future__ import annotations

from pathlib import Path

import typer

from .main import merge_options
from .refusal import refuse


def moe_command(
    config: Path = typer.Argument(..., help="MoE config YAML (mergekit-moe's keys: base_model, experts with "
                                             "source_model and positive_prompts, gate_mode, dtype, "
                                             "experts_per_token)."),
    out_dir: Path = typer.Argument(..., help="Folder to write the Mixtral model to."),
    shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    allow_pickle: bool = typer.Option(False, help="Load .bin weights with torch.load(weights_only=True)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists (only once the build succeeded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    device: str = typer.Option("cpu", "--device", help="Where the base runs to build a router from prompts: cpu, "
                                                       "cuda or cuda:N."),
) -> None:
    """Build a mixture of experts: the base's attention and embeddings, each expert's MLP, a router from prompts."""
    from ..errors import MergegateError
    from ..moe import build_moe

    options = merge_options(shard_size=shard_size, allow_pickle=allow_pickle, overwrite=overwrite,
                            progress=False if quiet else None, device=device)
    try:
        result = build_moe(config, out_dir, options)
    except (MergegateError, ValueError) as exc:
        refuse(exc)
    experts = result.provenance["recipe"]["experts"]
    typer.echo(f"wrote a Mixtral of {len(experts)} experts ({result.provenance['gate_mode']} router; "
               f"{result.parameters:,} parameters, {result.active_parameters:,} active per token) to "
               f"{result.out_dir}")


def register(app: typer.Typer) -> None:
    app.command("moe")(moe_command)
