"""`mergegate search SPACE.yaml`: the gate-aware merge search (mergegate.search). Wired into the CLI with
`register(app)`; Optuna, Ray and torch are imported only when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .eval_options import takes_eval_options
from .main import SERVE_CANDIDATE, SERVE_TIMEOUT, _keep_freed_memory, candidate_serving
from .refusal import refuse

if TYPE_CHECKING:
    from ..evaluate import EvalOptions


@takes_eval_options(sharding=False)  # its --ray-address is the trials' cluster
def search_command(
    space: Path = typer.Argument(..., help="Search space: a mergekit recipe in which a value may be a range or "
                                            "choice mapping (docs/search.md)."),
    suite: Path = typer.Option(..., help="Dev suite JSONL: the only rows trials are scored on."),
    held_out: Path = typer.Option(..., help="Held-out suite JSONL (disjoint from the dev rows): the best trials "
                                            "are released through the gate on it."),
    policy: Optional[Path] = typer.Option(None, help="Policy YAML (default rules when omitted)."),
    out: Path = typer.Option(Path("search-out"), help="Folder for the study (resumable), kept trials, reports, "
                                                      "best.yaml and rollout.yaml."),
    trials: int = typer.Option(20, help="Trials in all (a resumed search goes on up to this many)."),
    parallel: int = typer.Option(1, help="Trials in flight at once (Ray tasks)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: start a local one "
                                                         "bounded to parallel × cpus-per-trial cores)."),
    seed: int = typer.Option(0, help="Seed of the sampler and of random merge methods: same seed, same trials."),
    objective: str = typer.Option("gate", help="gate (cohorts promoted, then the worst cohort's retention), "
                                               "mean (the mean score, for comparison) or pareto (per-cohort "
                                               "retentions, NSGA-II)."),
    sampler: Optional[str] = typer.Option(None, help="tpe (default), cmaes, random, or nsga2 (pareto)."),
    keep: int = typer.Option(3, help="Best trials kept and released on the held-out suite."),
    prune: bool = typer.Option(True, help="Stop a trial once it cannot promote as many cohorts as the best."),
    cpus_per_trial: int = typer.Option(1, help="CPU cores Ray reserves for each trial (its merge and "
                                               "evaluation threads)."),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs Ray reserves for each trial."),
    memory_per_trial: Optional[str] = typer.Option(None, help="Memory Ray reserves for each trial's merge and "
                                                              "evaluation, e.g. 16GB (default: none reserved)."),
    serve_candidate: Optional[str] = SERVE_CANDIDATE,
    serve_timeout: float = SERVE_TIMEOUT,
    *, eval_options: EvalOptions,
) -> None:
    """Search a space of recipes for the merge the gate promotes most cohorts of; release the best on held-out rows."""
    from .. import MergegateError
    from ..errors import SearchError
    from ..search import SearchOptions, search

    _keep_freed_memory()
    try:
        memory = None
        if memory_per_trial is not None:
            from ..io.write import parse_size

            try:
                memory = parse_size(memory_per_trial)
            except ValueError as exc:
                raise SearchError(f"--memory-per-trial: {exc}") from None
        options = SearchOptions(trials=trials, parallel=parallel, seed=seed, objective=objective,  # type: ignore[arg-type]
                                sampler=sampler, keep=keep, prune=prune, ray_address=ray_address,  # type: ignore[arg-type]
                                cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                                memory_per_trial=memory, eval=eval_options,
                                serve=candidate_serving(serve_candidate, serve_timeout))
        result = search(space, suite, held_out, policy, out, options)
    except MergegateError as exc:
        refuse(exc)
    except KeyboardInterrupt:
        typer.echo(f"mergegate: search interrupted; its study is kept in {out}: run the same command again to "
                   "resume", err=True)
        raise typer.Exit(130) from None
    counts = {s: sum(t.status == s for t in result.trials) for s in ("complete", "pruned", "failed")}
    typer.echo(f"{len(result.trials)} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
               f"{counts['failed']} failed")
    for held in result.held_out:
        typer.echo(f"trial {held.trial.number}: dev {held.trial.promoted} promoted (worst "
                   f"{held.trial.worst_retention:.2f}), held-out {held.promoted} promoted (worst "
                   f"{held.worst_retention:.2f})")
    typer.echo(f"wrote {', '.join(str(p) for p in result.reports.values())}")


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
