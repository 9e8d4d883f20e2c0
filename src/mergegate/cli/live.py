"""`mergegate live status REGISTRY [--plan PLAN]` (a table per cohort in the terminal) and `mergegate live page
REGISTRY OUT.html` (the same and the evidence over time, as one HTML page): what the gateway's live loop decided,
read from its registry (mergegate.live.status). Wired into the CLI with `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .refusal import refuse


def _experiment(registry, plan: Optional[Path]) -> str:
    """The experiment of PLAN (its candidate and models), else the latest one recorded."""
    from ..errors import RegistryError

    if plan is not None:
        from ..gateway.live import experiment_id
        from ..rollout import load_plan

        wanted = experiment_id(load_plan(plan))
        if wanted not in registry.live_experiments():
            raise RegistryError(f"registry {registry.path}: no live experiment of plan {plan} (its candidate and "
                                "models) is recorded")
        return wanted
    recorded = registry.live_experiments()
    if not recorded:
        raise RegistryError(f"registry {registry.path}: no live experiment recorded (serve a plan with --policy)")
    return recorded[-1]


def _open(registry_path: Path):
    from ..errors import RegistryError
    from ..registry import Registry

    if not registry_path.is_file():
        raise RegistryError(f"registry {registry_path}: no such file")
    return Registry(registry_path)


def register(app: typer.Typer) -> None:
    live = typer.Typer(no_args_is_help=True, help="What the gateway's live loop decided, per cohort.")

    @live.command("status")
    def status_command(
        registry: Path = typer.Argument(..., help="The gateway's SQLite registry (serve --registry)."),
        plan: Optional[Path] = typer.Option(None, help="The served rollout plan: its experiment (default: the "
                                                       "latest recorded)."),
    ) -> None:
        """Per cohort: phase, rows, interval, e-values, last decision, plan version, drift."""
        from rich.console import Console
        from rich.table import Table

        from ..errors import MergegateError
        from ..live.status import CohortStatus, cohort_statuses

        try:
            reg = _open(registry)
            experiment = _experiment(reg, plan)
        except MergegateError as exc:
            refuse(exc)
        steps = reg.live_steps(experiment)
        table = Table(title=f"live experiment {experiment}: plan version {steps[-1]['version']}")
        for name in CohortStatus.HEADER:
            table.add_column(name)
        for status in cohort_statuses(steps, reg.live_state(experiment), reg.drift_events(experiment)):
            table.add_row(*status.cells())
        Console(width=160).print(table)

    @live.command("page")
    def page_command(
        registry: Path = typer.Argument(..., help="The gateway's SQLite registry (serve --registry)."),
        out: Path = typer.Argument(..., help="HTML file to write."),
        plan: Optional[Path] = typer.Option(None, help="The served rollout plan: its experiment (default: the "
                                                       "latest recorded)."),
    ) -> None:
        """One HTML page: the status per cohort, every plan step with its reason, and the evidence over time."""
        from ..errors import MergegateError
        from ..live.status import CohortStatus, cohort_statuses, evidence_over_time
        from ..report_page import html_page, html_table

        try:
            reg = _open(registry)
            experiment = _experiment(reg, plan)
        except MergegateError as exc:
            refuse(exc)
        steps = reg.live_steps(experiment)
        statuses = cohort_statuses(steps, reg.live_state(experiment), reg.drift_events(experiment))
        body = (f"<h1>Live experiment {experiment}</h1>"
                + html_table(CohortStatus.HEADER, [s.cells() for s in statuses])
                + "<h2>Plan steps</h2>"
                + html_table(("version", "cohort", "from", "to", "action", "actor", "reason", "plan after"),
                             [(str(s["version"]), s["cohort"], s["phase_before"], s["phase_after"], s["action"],
                               s["actor"], s["reason"], s["plan_after"]) for s in steps])
                + "<h2>Evidence over time</h2>"
                + html_table(("test", "rows", "interval", "promote e", "rollback e", "sources"),
                             evidence_over_time(reg.live_rows(experiment))))
        out.write_text(html_page(f"mergegate live {experiment}", body))
        typer.echo(f"wrote {out}")

    app.add_typer(live, name="live")
