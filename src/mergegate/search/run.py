"""The merge search: Optuna draws recipes from a space, Ray runs the trials, the gate scores them.

A trial is scored on the dev suite exactly as the gate would score its release (`gate.decide` against the base
and every source, evaluated once and cached in the registry): by default first by how many cohorts it would
promote, then by the worst cohort's retention (`pipeline.release_rank`) — never by a mean, which can buy one
cohort's gain with another's silent loss. `objective="mean"` (mergekit-evolve's objective: the mean score) is
there to compare against; `objective="pareto"` searches the front of per-cohort retentions (NSGA-II).

Determinism and resume: trials run in rounds of `parallel`; each draw reseeds the sampler from (seed, how many
trials were finished before it; `_seeds.derived_seed`), and a round's results are told in trial order, so the same
seed draws the same recipes whatever the timing. The study lives in OUT/study.sqlite: a search killed at any point
(mid-draw, mid-round) and started again with the same arguments re-runs the trials that were in flight (same
recipes: a draw cut short is drawn again whole) in the rest of their round, and goes on; a finished one is read
back. Trials that fail (a refused recipe, a crash, out of memory) are recorded with their reason.

After the trials, the best `keep` (by the dev rank) are released through the normal gate on the held-out suite:
the report shows dev and held-out side by side, and the gap is the search's overfitting to its dev rows.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .._seeds import derived_seed
from .._staging import check_output, locked
from ..errors import MergegateError, SearchError
from ..evaluate import EvalOptions, ModelRun, Suite, evaluate_models, load_suite
from ..evaluate.runner import check_models, config_hash
from ..gate import GateResult, Policy, decide, load_policy
from ..model_ref import ModelRef
from ..pipeline import ReleaseResult, ServeCommand, gate_release, release_models, release_rank
from ..registry import Registry, RowResult
from .space import Space, load_space
from .trial import TrialOutcome, TrialSpec

Objective = Literal["gate", "mean", "pareto"]
SamplerKind = Literal["tpe", "cmaes", "random", "nsga2"]
STUDY_NAME = "mergegate-search"
STARTUP_TRIALS = 6  # TPE draws at random until this many trials are in (fixed: a resumed study draws alike)
# Trials in flight and cores or GPUs per trial beyond any cluster, and memory per trial beyond any machine: Ray
# refuses resource counts past 1e14 with a traceback, so a typo is refused here with its name.
MAX_RESOURCES = 4096
MAX_MEMORY = 64 << 40


@dataclass(frozen=True)
class SearchOptions:
    """How a search runs. Only `seed`, `sampler`, `objective`, `prune` and the evaluation's `max_new_tokens` and
    device can change which recipes are drawn or how they rank; `parallel`, the per-trial resources and the Ray
    address never do."""

    trials: int = 20
    parallel: int = 1  # trials in flight (one round); results are told in trial order
    seed: int = 0
    sampler: SamplerKind | None = None  # None: TPE, or NSGA-II for the pareto objective
    objective: Objective = "gate"
    keep: int = 3  # the best trials' folders kept and released on the held-out suite
    prune: bool = True  # stop a trial once it cannot rank first (gate objective only; see search.trial)
    ray_address: str | None = None  # None: a local Ray bounded to parallel × cpus_per_trial cores
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    memory_per_trial: int | None = None  # bytes Ray reserves for a trial's merge and evaluation
    eval: EvalOptions = field(default_factory=EvalOptions)  # every evaluation's (trials run theirs on cpus_per_trial)
    serve: ServeCommand | None = None  # each trial's candidate evaluated through its own server

    def replaced(self, **changes: Any) -> SearchOptions:
        """These options with `changes` made, each a field of SearchOptions or of its EvalOptions (`batch_size=8`)."""
        own = {f.name for f in fields(self)}
        evaluation = {name: value for name, value in changes.items() if name not in own}
        options = replace(self, **{name: value for name, value in changes.items() if name in own})
        return replace(options, eval=replace(options.eval, **evaluation)) if evaluation else options

    def problems(self) -> list[str]:
        found = []
        for name, low, high in (("trials", 1, None), ("parallel", 1, MAX_RESOURCES), ("keep", 1, None),
                                ("cpus_per_trial", 1, MAX_RESOURCES)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
                bounds = f"from {low} to {high}" if high else f">= {low}"
                found.append(f"{name} must be a whole number {bounds}, got {value!r}")
        if self.objective not in ("gate", "mean", "pareto"):
            found.append(f"objective must be gate, mean or pareto, got {self.objective!r}")
        if self.sampler not in (None, "tpe", "cmaes", "random", "nsga2"):
            found.append(f"sampler must be tpe, cmaes, random or nsga2, got {self.sampler!r}")
        if self.sampler == "nsga2" and self.objective != "pareto":
            found.append("the nsga2 sampler searches the pareto objective (several values), not a single one")
        if self.sampler == "cmaes" and self.objective == "pareto":
            found.append("the cmaes sampler optimises one value; use nsga2 (the default) for the pareto objective")
        if not (isinstance(self.gpus_per_trial, (int, float)) and 0 <= self.gpus_per_trial <= MAX_RESOURCES):
            found.append(f"gpus_per_trial must be from 0 to {MAX_RESOURCES}, got {self.gpus_per_trial!r}")
        memory = self.memory_per_trial
        if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool)
                                   or not 0 < memory <= MAX_MEMORY):
            found.append(f"memory_per_trial must be from 1 byte to {MAX_MEMORY >> 40} TiB, got {memory!r}")
        if self.eval.sharded:
            found.append("the evaluation's workers and ray address are not a search's: its trials run as Ray tasks "
                         "(parallel, ray_address)")
        return found


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study holds it."""

    number: int
    status: str  # complete, pruned, failed
    params: dict[str, Any]
    recipe_yaml: str
    reason: str | None = None
    promoted: int | None = None
    worst_retention: float | None = None
    mean_score: float | None = None
    retention: dict[str, float] = field(default_factory=dict)  # per cohort, on the dev rows
    decisions: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # kept for the best trials only
    merge_s: float = 0.0
    evaluate_s: float = 0.0

    @property
    def rank(self) -> tuple[int, float]:
        return (self.promoted or 0, self.worst_retention if self.worst_retention is not None else -math.inf)


@dataclass(frozen=True)
class HeldOut:
    trial: TrialRecord
    release: ReleaseResult

    @property
    def promoted(self) -> int:
        return release_rank(self.release.gate)[0]

    @property
    def worst_retention(self) -> float:
        return release_rank(self.release.gate)[1]


@dataclass(frozen=True)
class SearchResult:
    out: Path
    space: Space
    trials: list[TrialRecord]  # in trial order, interrupted re-runs left out
    best: list[TrialRecord]  # the kept trials, best first by the dev rank
    held_out: list[HeldOut]  # the kept trials' gated releases on the held-out suite, same order
    dev_runs: dict[str, ModelRun]  # the base and sources on the dev rows
    reports: dict[str, Path]


def search(space: Space | str | Path | dict, dev: Suite | str | Path, held_out: Suite | str | Path,
           policy: Policy | dict | str | Path | None, out: str | Path,
           options: SearchOptions | None = None, **overrides: Any) -> SearchResult:
    """Search the space for the recipe whose release the policy likes best; release the best `keep` on
    `held_out`. Writes OUT/study.sqlite (the resumable study), OUT/registry.sqlite, OUT/trials/ (the kept
    folders), OUT/held-out/trial-N/ (each kept trial's gated release), OUT/best.yaml (the winning recipe as plain
    mergekit YAML), OUT/rollout.yaml and OUT/search.md, OUT/search.html. Keyword `overrides` replace fields of
    `options` or of its EvalOptions (`search(..., trials=8, parallel=2, batch_size=8)`)."""
    options = (options or SearchOptions()).replaced(**overrides)
    problems = options.problems()
    if problems:
        raise SearchError("search: " + "; ".join(problems))
    out = Path(out)
    try:
        check_output(out, overwrite=True)  # a file, or under one, or unwritable: refused before any work
    except MergegateError as exc:
        raise SearchError(f"search: {exc}") from None
    space = space if isinstance(space, Space) else load_space(space)
    dev = dev if isinstance(dev, Suite) else load_suite(dev)
    held_out = held_out if isinstance(held_out, Suite) else load_suite(held_out)
    _check_disjoint(dev, held_out)
    policy = load_policy(policy)
    policy.check_cohorts(dev.cohorts)
    policy.check_cohorts(held_out.cohorts)
    evaluation = replace(options.eval, device=options.eval.resolved_device)  # the driver's, for every trial too
    if options.serve is not None:  # before any trial: an unservable suite fails now
        options.serve.check_rows("candidate", dev.rows)
    models = release_models(space.fixed_point(), out / "trials" / "candidate", "candidate")
    base = next(ref for ref, role in models if role == "base")
    sources = [ref for ref, role in models if role == "source"]
    names = {base.name, *(s.name for s in sources)}
    for taken in ("candidate",):
        if taken in names:
            raise SearchError(f"search: a source model is named '{taken}', the name trials are evaluated under")
    check_models([base, *sources], evaluation.endpoint)  # a missing model is named before OUT is made

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"search: {out}: cannot be created ({exc.strerror or exc})") from None
    # one search per OUT: a second would take the first's running trials for a killed search's and re-run them
    busy = SearchError(f"search: {out} is being written by another search; wait for it to end, or give another "
                       "--out")
    with locked(out, busy):
        registry = Registry(out / "registry.sqlite")
        try:
            try:
                dev_runs = evaluate_models([(base, "base"), *((s, "source") for s in sources)], dev, registry,
                                           evaluation)
                study = _open_study(out, space, dev, policy, options)
            except MergegateError:
                if created:  # refused before any trial: the folder this search made goes with it
                    registry.close()
                    shutil.rmtree(out, ignore_errors=True)
                raise
            source_results = {name: run.results for name, run in dev_runs.items()}
            _run_trials(study, space, dev, policy, registry, base, sources, source_results, out,
                        replace(options, eval=evaluation))
            trials = _records(study, out)
            best = _best(trials, options)
            _prune_folders(trials, best)
            _remove_leftovers(out, best)
            held = [HeldOut(record, gate_release(
                ModelRef(f"trial-{record.number}", record.folder), base, sources, held_out, policy,
                out / "held-out" / f"trial-{record.number}", eval=evaluation, registry=registry,
                title=f"held-out gate: trial {record.number}"))
                for record in best if record.folder is not None]
            from .report import write_search_reports

            reports = write_search_reports(out, space, trials, best, held, dev, held_out, policy, options)
        finally:
            registry.close()
    return SearchResult(out, space, trials, best, held, dev_runs, reports)


def _check_disjoint(dev: Suite, held_out: Suite) -> None:
    """A dev row that is also a held-out row makes the held-out check a second look at the dev rows."""
    shared_ids = {r.id for r in dev.rows} & {r.id for r in held_out.rows}
    shared_prompts = {r.asked for r in dev.rows} & {r.asked for r in held_out.rows}
    if shared_ids or shared_prompts:
        shown = sorted(shared_ids)[:3] or [repr(p[:40]) for p in sorted(shared_prompts)[:3]]
        raise SearchError(f"search: the dev suite {dev.path} and the held-out suite {held_out.path} share "
                          f"{len(shared_ids)} row id(s) and {len(shared_prompts)} prompt(s) (e.g. {', '.join(shown)}); "
                          "the held-out rows must be unseen by the search")


# -- the study ----------------------------------------------------------------------------------------------------

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(options: SearchOptions, seed: int):
    optuna = _optuna()
    kind = options.sampler or ("nsga2" if options.objective == "pareto" else "tpe")
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "cmaes":  # CMA-ES over the numbers; categorical values (the method) drawn independently
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, options.parallel))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)


def _identity(space: Space, dev: Suite, policy: Policy, options: SearchOptions) -> dict[str, Any]:
    """What a resumed study must share with the one it resumes: otherwise its trials are another search's."""
    return {"space": space.sha256, "dev_suite": dev.sha256, "policy": policy.sha256, "seed": options.seed,
            "sampler": options.sampler or "", "objective": options.objective, "prune": options.prune,
            "max_new_tokens": options.eval.max_new_tokens}


def _open_study(out: Path, space: Space, dev: Suite, policy: Policy, options: SearchOptions):
    optuna = _optuna()
    storage = f"sqlite:///{(out / 'study.sqlite').absolute()}"
    directions = ["maximize"] * (len(dev.cohorts) if options.objective == "pareto" else 1)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                                directions=directions, sampler=_sampler(options, options.seed))
    identity = _identity(space, dev, policy, options)
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("cohorts", dev.cohorts)
    elif recorded != identity:
        changed = sorted(k for k in identity if recorded.get(k) != identity[k])
        raise SearchError(f"search: {out} holds a search with another {', '.join(changed)}; resume it with the same "
                          "inputs, or give a new --out")
    return study


def _run_trials(study, space: Space, dev: Suite, policy: Policy, registry: Registry, base: ModelRef,
                sources: list[ModelRef], source_results: dict[str, list[RowResult]], out: Path,
                options: SearchOptions) -> None:
    optuna = _optuna()
    states = optuna.trial.TrialState
    _requeue_interrupted(study)
    _remove_leftovers(out, _records(study, out))
    finished = _finished(study)
    if finished >= options.trials:
        return
    from ..progress import Progress
    from .ray_tasks import TrialRunner

    trial_eval = replace(options.eval, threads=options.cpus_per_trial, progress=False)
    with TrialRunner(options) as runner, Progress(options.eval.progress) as bar:
        advance = bar.task("searching", options.trials, completed=finished, unit="trials")
        while finished < options.trials:
            round_specs: list[TrialSpec | None] = []
            asked = []
            # Rounds start at multiples of `parallel`, as an uninterrupted search's: a search killed while telling
            # a round resumes with the rest of that round, which sees (and prunes against) what that round saw.
            started = finished - finished % options.parallel
            stop_below = _stop_below(study, options, started)
            for slot in range(min(options.parallel - finished % options.parallel, options.trials - finished)):
                # a seed per draw, derived by hash (consecutive seeds give correlated first draws)
                study.sampler = _sampler(options, derived_seed(options.seed, f"draw-{finished + slot}") % 2**32)
                trial = study.ask()
                _take_over_sampler_state(study, trial)
                asked.append(trial)
                try:
                    recipe = space.point(trial)
                except Exception as exc:  # noqa: BLE001 — a point that is no recipe is a failed trial, recorded
                    trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
                    round_specs.append(None)
                    continue
                trial.set_user_attr("recipe", recipe.to_yaml())
                round_specs.append(TrialSpec(
                    number=trial.number, recipe_yaml=recipe.to_yaml(),
                    recipe_folder=str(space.folder) if space.folder else None,
                    folder=str((out / "trials" / f"trial-{trial.number:04d}").absolute()),
                    dev_suite=dev, candidate="candidate", base=base.name,
                    sources=tuple(s.name for s in sources), source_results=source_results, policy=policy,
                    seed=options.seed, eval=trial_eval, stop_below=stop_below, serve=options.serve))
            outcomes = runner.run([spec for spec in round_specs if spec is not None])
            for trial, spec in zip(asked, round_specs):  # told in trial order: the next draw sees the same history
                if spec is None:
                    study.tell(trial, state=states.FAIL)
                else:
                    _tell(study, trial, outcomes[spec.number], dev, policy, registry, base, sources, source_results,
                          Path(spec.folder), options)
                finished += 1
                advance(1)


def _requeue_interrupted(study) -> None:
    """Queue each trial a killed search left running to be drawn again (`rerun_of`), then mark it failed. A search
    killed while doing this does it again without queuing a trial twice."""
    states = _optuna().trial.TrialState
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("rerun_of") for t in trials if t.state == states.WAITING}
    for stale in trials:
        if stale.state != states.RUNNING:
            continue
        if stale.number not in queued:
            study.enqueue_trial(_drawn(stale, trials), user_attrs={"rerun_of": stale.number}, skip_if_exists=False)
        study.tell(stale.number, state=states.FAIL)


def _drawn(trial, trials: list) -> dict[str, Any]:
    """The values an interrupted trial is drawn again with: all of its own once its draw finished (its recipe or
    why it is none is recorded), else the ones it was queued with as a re-run, else none. Never some of a draw:
    fixing those would shift the seeded sampler's stream onto the rest, while drawing afresh with the same seed
    and history gives the same values."""
    if "recipe" in trial.user_attrs or "failure" in trial.user_attrs:
        return dict(trial.params)
    if "rerun_of" in trial.user_attrs:
        return _drawn(trials[trial.user_attrs["rerun_of"]], trials)  # a study's trials are listed by number
    return {}


def _take_over_sampler_state(study, trial) -> None:
    """A re-run takes over what the sampler recorded on the trial it re-runs (NSGA-II's generation, CMA-ES's
    solution), so the sampler counts it where it counted the interrupted one; its queued values stay its own."""
    original = trial.user_attrs.get("rerun_of")
    if original is None:
        return
    recorded = study.get_trials(deepcopy=False)[original].system_attrs
    for key, value in recorded.items():
        if key != "fixed_params":  # Optuna has no public setter for a trial's system attributes
            study._storage.set_trial_system_attr(trial._trial_id, key, value)


def _interrupted(study) -> set[int]:
    """Trials a killed search left running: each was drawn again (`rerun_of`) and counts only as its re-run."""
    return {t.user_attrs["rerun_of"] for t in study.get_trials(deepcopy=False) if "rerun_of" in t.user_attrs}


def _counted(study) -> list:
    """Trials that count towards the budget, in the order they were drawn: every finished one except those
    interrupted (drawn again; a re-run is numbered after every trial drawn before it)."""
    interrupted = _interrupted(study)
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number not in interrupted]


def _finished(study) -> int:
    return len(_counted(study))


def _stop_below(study, options: SearchOptions, drawn_before: int) -> int | None:
    """The best promoted count among the complete trials of the first `drawn_before` (those before the round): a
    trial that cannot reach it is pruned (gate objective only)."""
    if not options.prune or options.objective != "gate":
        return None
    counts = [t.user_attrs.get("promoted") for t in _counted(study)[:drawn_before]
              if t.state.name == "COMPLETE" and t.user_attrs.get("promoted") is not None]
    return max(counts) if counts else None


def objective_values(gate: GateResult, objective: Objective, cohorts: list[str]) -> list[float]:
    """The value(s) Optuna maximises for a trial's gate result.

    gate: promoted + 0.999 × worst retention clipped to [0, 1] — the lexicographic order of
    `release_rank` as one number (a retention above 1 keeps its cohort fully, as 1 does). mean: the mean of the
    cohorts' candidate means (what an evolutionary merge maximises). pareto: each cohort's retention."""
    if objective == "pareto":
        return [gate.decision(c).retention for c in cohorts]
    if objective == "mean":
        return [sum(d.candidate_mean for d in gate.decisions) / len(gate.decisions)]
    promoted, worst = release_rank(gate)
    return [promoted + 0.999 * min(max(worst, 0.0), 1.0)]


def _tell(  # noqa: PLR0913  (a finished trial recorded in one place: the study, the registry, its folder)
        study, trial, outcome: TrialOutcome, dev: Suite, policy: Policy, registry: Registry, base: ModelRef,
          sources: list[ModelRef], source_results: dict[str, list[RowResult]], folder: Path,
          options: SearchOptions) -> None:
    optuna = _optuna()
    trial.set_user_attr("merge_s", round(outcome.merge_s, 3))
    trial.set_user_attr("evaluate_s", round(outcome.evaluate_s, 3))
    if outcome.status == "failed":
        trial.set_user_attr("failure", outcome.reason)
        shutil.rmtree(folder, ignore_errors=True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    evaluated = list(dict.fromkeys(r.cohort for r in outcome.results))  # a pruned trial's are some cohorts
    gate = decide({"candidate": outcome.results, **source_results}, candidate="candidate", base=base.name,
                  sources=[s.name for s in sources], policy=policy.for_cohorts(evaluated))
    trial.set_user_attr("retention", {d.cohort: d.retention for d in gate.decisions})
    trial.set_user_attr("decisions", {d.cohort: d.decision for d in gate.decisions})
    if outcome.status == "pruned":
        trial.set_user_attr("pruned", outcome.reason)
        shutil.rmtree(folder, ignore_errors=True)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    assert outcome.model_hash is not None and outcome.config is not None
    model_hash = registry.register_model(f"trial-{trial.number}", folder, role="candidate",
                                         model_hash=outcome.model_hash)
    run_id = registry.open_run(model_hash, dev.sha256, config_hash(outcome.config), outcome.config)
    registry.add_results(run_id, outcome.results)
    registry.finish_run(run_id, [row.id for row in dev.rows])
    promoted, worst = release_rank(gate)
    trial.set_user_attr("promoted", promoted)
    trial.set_user_attr("worst_retention", worst)
    trial.set_user_attr("mean_score", sum(d.candidate_mean for d in gate.decisions) / len(gate.decisions))
    trial.set_user_attr("folder", str(folder))
    study.tell(trial, objective_values(gate, options.objective, dev.cohorts))
    records = _records(study, folder.parent.parent)
    _prune_folders(records, _best(records, options))


# -- reading the study back ---------------------------------------------------------------------------------------

def _records(study, out: Path) -> list[TrialRecord]:
    records = []
    interrupted = _interrupted(study)
    for t in study.get_trials(deepcopy=False):
        if t.number in interrupted or not t.state.is_finished():
            continue
        status = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, "failed")
        folder = t.user_attrs.get("folder")
        records.append(TrialRecord(
            t.number, status, dict(t.params), t.user_attrs.get("recipe", ""),
            reason=t.user_attrs.get("failure") or t.user_attrs.get("pruned"),
            promoted=t.user_attrs.get("promoted"), worst_retention=t.user_attrs.get("worst_retention"),
            mean_score=t.user_attrs.get("mean_score"), retention=t.user_attrs.get("retention", {}),
            decisions=t.user_attrs.get("decisions", {}),
            folder=Path(folder) if folder and Path(folder).is_dir() else None,
            merge_s=t.user_attrs.get("merge_s", 0.0), evaluate_s=t.user_attrs.get("evaluate_s", 0.0)))
    return records


def _best(trials: list[TrialRecord], options: SearchOptions) -> list[TrialRecord]:
    """The `keep` best complete trials: by the objective's own order (rank for gate, the mean for mean; for pareto
    the rank too, the front is in the report), earlier trials first on ties."""
    complete = [t for t in trials if t.status == "complete"]
    def key(t: TrialRecord) -> tuple[float, float, int]:
        if options.objective == "mean":
            return (-(t.mean_score or 0.0), 0.0, t.number)
        return (-t.rank[0], -t.rank[1], t.number)

    return sorted(complete, key=key)[:options.keep]


_TRIAL_LEFTOVER = re.compile(r"trial-\d{4,}|\.trial-\d{4,}-eval\.sqlite(?:-wal|-shm|-journal)?")


def _remove_leftovers(out: Path, records: list[TrialRecord]) -> None:
    """Remove what trials left in OUT/trials when their search or worker was killed — merged folders and scratch
    registries — keeping the folders `records` hold (the kept trials'). Only while no trial runs."""
    keep = {record.folder.name for record in records if record.folder is not None}
    try:
        entries = list((out / "trials").iterdir())
    except OSError:
        return
    for entry in entries:
        if not _TRIAL_LEFTOVER.fullmatch(entry.name) or entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _prune_folders(trials: list[TrialRecord], best: list[TrialRecord]) -> None:
    """Keep only the best trials' merged folders: the other scored trials' bytes are not needed. (Trials of the
    round still being told are not among `trials` yet, so their folders stay.)"""
    keep = {t.number for t in best}
    for record in trials:
        if record.folder is not None and record.number not in keep:
            shutil.rmtree(record.folder, ignore_errors=True)
