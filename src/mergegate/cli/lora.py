"""`mergegate lora merge|combine|extract`: LoRA adapters. Wired into the CLI with `register(app)`; torch and
the LoRA code are imported only when a command runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from .refusal import refuse

COMBINATION_HELP = ("cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
                    "magnitude_prune, magnitude_prune_svd")


def parse_weights(text: Optional[str], count: int) -> list[float]:
    """'0.5,0.5' or '0.5 0.5' → floats, one per adapter (all 1.0 when not given)."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.5") from None
    if len(weights) != count:
        raise ValueError(f"--weights {text!r}: {len(weights)} weight(s) for {count} adapter(s)")
    return weights


def _targets(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t for t in re.split(r"[,\s]+", text.strip()) if t]


def register(app: typer.Typer) -> None:
    lora = typer.Typer(no_args_is_help=True, help="LoRA adapters: merge into a base, combine, extract by SVD.")

    @lora.command("merge")
    def merge_command(
        base: Path = typer.Argument(..., help="Base model folder (Hugging Face format)."),
        adapter: Path = typer.Argument(..., help="PEFT LoRA adapter folder trained on BASE."),
        out_dir: Path = typer.Argument(..., help="Folder to write the merged model to."),
        weight: float = typer.Option(1.0, help="Multiplier on the adapter's delta."),
        shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB or 500MB."),
        allow_pickle: bool = typer.Option(False, help="Load .bin weights with torch.load(weights_only=True)."),
        overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists (only once the merge succeeded)."),
    ) -> None:
        """Write BASE + weight · scaling · B@A as a full model in OUT_DIR."""
        from ..errors import MergegateError
        from ..lora import merge_adapter

        try:
            out = merge_adapter(base, adapter, out_dir, weight=weight, shard_size=shard_size,
                                allow_pickle=allow_pickle, overwrite=overwrite)
        except (MergegateError, ValueError) as exc:
            refuse(exc)
        typer.echo(f"merged adapter {adapter} into {base}: {out}")

    @lora.command("combine")
    def combine_command(
        adapters: list[Path] = typer.Argument(..., help="Adapter folders, then the output folder last."),
        out_dir: Path = typer.Argument(..., help="Folder to write the combined adapter to."),
        combination_type: str = typer.Option("svd", "--type", help=f"One of: {COMBINATION_HELP}."),
        weights: Optional[str] = typer.Option(None, help="One weight per adapter, e.g. 0.5,0.5 (default 1 each)."),
        density: Optional[float] = typer.Option(None, help="Fraction kept by the ties/dare/magnitude types."),
        svd_rank: Optional[int] = typer.Option(None, help="Rank of the *svd types (default: largest input rank)."),
        svd_clamp: Optional[float] = typer.Option(None, help="Clamp the SVD factors at this quantile."),
        majority_sign_method: str = typer.Option("total", help="ties sign election: total or frequency."),
        seed: int = typer.Option(0, help="Seed of the dare types' random masks."),
        allow_pickle: bool = typer.Option(False, help="Load .bin weights with torch.load(weights_only=True)."),
        overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
    ) -> None:
        """Combine ADAPTERS into one PEFT adapter in OUT_DIR (PEFT's add_weighted_adapter types)."""
        from ..errors import MergegateError
        from ..lora import combine_adapters

        try:
            out = combine_adapters(adapters, parse_weights(weights, len(adapters)), combination_type, out_dir,
                                   density=density, svd_rank=svd_rank, svd_clamp=svd_clamp,
                                   majority_sign_method=majority_sign_method, seed=seed,
                                   allow_pickle=allow_pickle, overwrite=overwrite)
        except (MergegateError, ValueError) as exc:
            refuse(exc)
        typer.echo(f"combined {len(adapters)} adapter(s) ({combination_type}) into {out}")

    @lora.command("extract")
    def extract_command(
        base: Path = typer.Argument(..., help="Base model folder."),
        finetuned: Path = typer.Argument(..., help="Fine-tuned model folder (same architecture as BASE)."),
        out_dir: Path = typer.Argument(..., help="Folder to write the adapter to."),
        rank: Optional[int] = typer.Option(None, help="Fixed rank (the cap when --energy is given too)."),
        energy: Optional[float] = typer.Option(None, help="Per module, the smallest rank keeping this fraction "
                                                          "of the squared singular values, e.g. 0.9."),
        target_modules: Optional[str] = typer.Option(None, help="Modules to extract, e.g. q_proj,v_proj "
                                                                "(default: every linear weight)."),
        alpha: Optional[float] = typer.Option(None, help="lora_alpha (default: each module's rank, scaling 1)."),
        allow_pickle: bool = typer.Option(False, help="Load .bin weights with torch.load(weights_only=True)."),
        overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
    ) -> None:
        """Extract FINETUNED − BASE as a PEFT LoRA adapter (truncated SVD per linear weight) into OUT_DIR."""
        import json
        import warnings

        from ..errors import MergegateError
        from ..lora import extract_adapter
        from ..lora.extract import REPORT_FILE

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = extract_adapter(base, finetuned, out_dir, rank=rank, energy=energy,
                                      target_modules=_targets(target_modules), alpha=alpha,
                                      allow_pickle=allow_pickle, overwrite=overwrite)
        except (MergegateError, ValueError) as exc:
            refuse(exc)
        for warning in caught:
            typer.echo(f"warning: {warning.message}", err=True)
        report = json.loads((out / REPORT_FILE).read_text())
        ranks = sorted({m["rank"] for m in report["modules"]})
        worst = max((m["relative_error"] for m in report["modules"]), default=0.0)
        typer.echo(f"extracted {len(report['modules'])} modules (rank {', '.join(map(str, ranks))}; largest "
                   f"relative error {worst:.3g}) into {out}")

    app.add_typer(lora, name="lora")
