"""`mergegate` commands. Each parses options, calls one API function, and turns refusals into exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge models as release candidates: merge, evaluate, gate, roll out.")

REFUSED = 2


def _keep_freed_memory() -> None:
    """Let glibc reuse freed large blocks instead of unmapping them: merging allocates and frees many
    tensor-sized temporaries, and fresh mappings cost a page fault per 4 KiB. Only the CLI's own process
    is tuned; the library never changes its host's allocator."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _refuse(error: Exception) -> None:
    typer.echo(f"mergegate: {error}", err=True)
    raise typer.Exit(REFUSED)


@app.command("merge")
def merge_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's schema)."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged model to."),
    shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    allow_pickle: bool = typer.Option(False, help="Load .bin/.pt weights with torch.load(weights_only=True)."),
    seed: int = typer.Option(0, "--seed", "--random-seed", help="Seed for random methods (DARE)."),
    workers: Optional[int] = typer.Option(None, help="Tensors merged in parallel (default: cores, at most 4)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists (only once the merge succeeded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge the models a recipe names into OUT_DIR (exit 2 with the reason when an input is refused)."""
    from .. import MergegateError, merge
    from ..checkpoint import parse_size

    try:
        parse_size(shard_size)
    except ValueError as exc:
        _refuse(exc)
    _keep_freed_memory()
    try:
        result = merge(recipe, out_dir, shard_size=shard_size, allow_pickle=allow_pickle, seed=seed,
                       workers=workers, overwrite=overwrite, progress=False if quiet else None)
    except MergegateError as exc:
        _refuse(exc)
    typer.echo(f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) into {result.out_dir} "
               f"in {result.seconds:.1f} s")


@app.command("methods")
def methods_command() -> None:
    """List the merge methods with their parameters and defaults."""
    from ..methods import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        params = [f"{p.name}={'required' if p.required else p.default!r}" for p in method.shared_params]
        params += [f"{p.name}[per model]={'required' if p.required else p.default!r}" for p in method.per_model_params]
        typer.echo(f"{name:18s} base={method.base:8s} {', '.join(params)}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the sample models and merges."),
) -> None:
    """Generate sample checkpoints, merge them with several methods, load and run each merge."""
    from ..demo import run_demo

    run_demo(out)


def main() -> None:
    app(prog_name="mergegate")


if __name__ == "__main__":
    sys.exit(main())
