"""`mergegate compare`: merges, the cohort's own adapter on a shared base and a learned router among the adapters,
each gated beside the same sources, with each serving plan's memory and latency (mergegate.compare). Wired into
the CLI with `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .eval_options import takes_eval_options
from .refusal import refuse

if TYPE_CHECKING:
    from ..evaluate import EvalOptions


@takes_eval_options(sharding=False)
def compare_command(
    base: str = typer.Option(..., help="NAME=PATH of the shared base."),
    adapter: list[str] = typer.Option(..., help="COHORT=PATH of a LoRA adapter on the base, named by the cohort it "
                                                "serves (repeat)."),
    merge: list[str] = typer.Option([], help="NAME=PATH of a merged candidate to compare (repeat)."),
    source: list[str] = typer.Option([], help="NAME=PATH of a full fine-tune evaluated as a source (repeat)."),
    suite: Path = typer.Option(..., help="Eval suite JSONL."),
    policy: Optional[Path] = typer.Option(None, help="Policy YAML (default rules when omitted)."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration JSONL whose rows name their cohort: trains "
                                                          "the router among the adapters (saved to OUT/router)."),
    router: Optional[Path] = typer.Option(None, help="A router saved by an earlier compare (OUT/router)."),
    out: Path = typer.Option(Path("compare-out"), help="Folder for compare.md, compare.html and the router."),
    registry: Optional[Path] = typer.Option(None, help="SQLite registry (default: OUT/registry.sqlite)."),
    *, eval_options: EvalOptions,
) -> None:
    """Gate merges, adapter routes on a shared base and a learned router side by side, with serving cost."""
    from ..compare import compare_adapters
    from ..errors import MergegateError
    from ..model_ref import ModelRef, resolve_model_ref

    try:
        adapters = {}
        for text in adapter:
            cohort, sep, path = text.partition("=")
            if not sep or not cohort or not path:
                raise MergegateError(f"--adapter {text!r}: expected COHORT=PATH")
            adapters[cohort] = Path(path)
        refs: list[list[ModelRef]] = [[resolve_model_ref(v) for v in values] for values in (merge, source)]
        result = compare_adapters(resolve_model_ref(base), adapters, suite, policy, out, merges=refs[0],
                                  sources=refs[1], calibration=calibration, router=router, eval=eval_options,
                                  registry=registry)
    except MergegateError as exc:
        refuse(exc)
    for cost in result.costs:
        typer.echo(f"{cost.plan}: {cost.holds}, {cost.parameter_bytes / 2**20:,.1f} MiB of parameters, "
                   f"p50 {cost.latency_p50_ms:.1f} ms")
    typer.echo(f"wrote {', '.join(str(p) for p in result.reports.values())}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
