"""Run N models on the same suite rows: which rows each model still needs, the cache, and every registry write.

A model already evaluated on this exact suite with the same run config is read from the registry instead of
re-run; an interrupted run resumes with the rows it had not finished. The cache key is (model hash, suite hash,
config hash): the model hash covers the files that change an answer (weights, config, generation config,
tokenizer and chat template, adapter; `io.hashing.folder_hash`), the config everything else (`local.run_config`
for a local model, `endpoint.run_config` for a url model).

The rows still to run go to `sharded.run_model_rows` (a local model through `evaluate.local`, a url model through
`evaluate.endpoint`) model by model in this process; or, with `workers` > 1 (CLI `--workers 2`) or a `ray_address`
(`--ray-address ray://HEAD:10001`), as Ray tasks, shards of rows × models (`sharded.run_sharded`; the `ray` extra).
Cache checks, resumes and every registry write stay in this process, and the answers are the same either way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator, Sequence

from ..errors import EvaluationError, RegistryError
from ..model_ref import ModelRef, Role
from ..progress import Progress
from ..registry import Registry, RowResult
from . import endpoint as _endpoint
from . import local
from .endpoint import EndpointSettings
from .evaluators import evaluator_identity
from .options import EvalOptions
from .sharded import PendingRun, run_model_rows, run_sharded
from .suite import Suite


@dataclass(frozen=True)
class ModelRun:
    ref: ModelRef
    role: Role
    model_hash: str
    run_id: int
    cached: bool  # read from the registry, not generated now
    results: list[RowResult]


def check_models(models: Sequence[ModelRef], endpoint: EndpointSettings) -> None:
    """Refuse an empty or ambiguous list of models, a url model's own bad endpoint settings (over the command's
    `endpoint`) and missing model folders before anything is loaded or recorded (EvaluationError). The
    settings themselves were checked when their EvalOptions was made."""
    problems = []
    if not models:
        problems.append("no models to evaluate")
    names = [ref.name for ref in models]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        problems.append(f"model name(s) given twice: {', '.join(duplicated)}")
    for ref in models:
        if ref.endpoint is not None:  # its own settings (a models file's block) over the command's
            own = ref.endpoint_settings(endpoint).problems()
            problems += [f"model '{ref.name}': {problem}" for problem in own]
        # a url model has no folders: its server is reached when it is evaluated (evaluate.endpoint)
        problems += [f"model '{ref.name}': {problem}" for problem in ref.folder_problems()]
    if problems:
        raise EvaluationError("evaluate: " + "; ".join(problems))


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def evaluate_models(models: Sequence[tuple[ModelRef, Role]], suite: Suite, registry: Registry,
                    options: EvalOptions | None = None) -> dict[str, ModelRun]:
    """Evaluate every (model, role) on every row of `suite` as `options` say (default EvalOptions()); results
    keyed by model name. The role is recorded in the registry beside the model. A url model is called through
    its server (evaluate.endpoint, with `options.endpoint`); perplexity rows are refused for it (EvaluationError).

    `options.device` is where the models run (default: "cuda" when torch sees a GPU, else "cpu").

    `options.threads` sets torch's intra-op threads for the run (default: half the cores, at least one): small
    models gain little from more, and oversubscribed OpenMP threads slow everything sharing the machine.

    `options.workers` > 1 or a `ray_address` runs the rows as Ray shards (`sharded`: rows × models, one CPU and,
    on CUDA, one GPU each); the default (None or 1, no address) runs them in this process. Either way the
    answers, the cache and the registry are the same.
    """
    options = options if options is not None else EvalOptions()
    _check(models, suite, options)
    device = options.resolved_device
    with local.torch_threads(options.threads):
        return _evaluate(models, suite, registry, options, device)


def evaluate_by_cohort(model: tuple[ModelRef, Role], suite: Suite, registry: Registry,
                       options: EvalOptions | None = None) -> Iterator[tuple[str, ModelRun]]:
    """`evaluate_models` for one model, a cohort at a time: the same checks, and the same run of the whole suite
    (its cache key, its rows, its results). After each cohort, in the suite's order, yields the cohort and the
    run so far (its results: the rows of the cohorts done, in suite order); the run is finished with the last.
    A caller that stops early (a search's pruned trial) leaves the run open, to resume like an interrupted one."""
    options = options if options is not None else EvalOptions()
    _check([model], suite, options)
    device = options.resolved_device
    ref, role = model
    with local.torch_threads(options.threads), Progress(options.progress) as bar:
        opened = _open(ref, role, suite, registry, options, device, bar)
        for done, cohort in enumerate(suite.cohorts, start=1):
            so_far = suite.cohorts[:done]
            if isinstance(opened, ModelRun):  # cached: read, not run
                yield cohort, replace(opened, results=[r for r in opened.results if r.cohort in so_far])
                continue
            _run_rows([replace(opened, rows=[row for row in opened.rows if row.cohort == cohort])], registry,
                      options, device)
            if done == len(suite.cohorts):
                yield cohort, _finished(opened, suite, registry)
            else:
                results = _in_suite_order(registry.results(opened.run_id, ref.name), suite, registry, opened.run_id,
                                          cohorts=so_far)
                yield cohort, ModelRun(ref, role, opened.model_hash, opened.run_id, False, results)


def _check(models: Sequence[tuple[ModelRef, Role]], suite: Suite, options: EvalOptions) -> None:
    """Refuse the models, and rows a model cannot answer, before anything is loaded or recorded."""
    check_models([ref for ref, _ in models], options.endpoint)
    for ref, _ in models:
        if ref.is_remote:
            _endpoint.check_rows(ref, suite.rows)
        else:
            local.check_chat_template(ref, suite.rows)


def _evaluate(models: Sequence[tuple[ModelRef, Role]], suite: Suite, registry: Registry, options: EvalOptions,
              device: str) -> dict[str, ModelRun]:
    """Cache checks, opened runs, resumes and finished runs here, in this process (the registry's one writer);
    the rows still to run go through `run_model_rows` model by model, or as Ray shards (`sharded`)."""
    runs: dict[str, ModelRun] = {}
    with Progress(options.progress) as bar:
        pending = []
        for ref, role in models:
            opened = _open(ref, role, suite, registry, options, device, bar)
            if isinstance(opened, ModelRun):
                runs[ref.name] = opened
            else:
                pending.append(opened)
        if options.sharded:
            _run_rows(pending, registry, options, device)
            for todo in pending:
                runs[todo.ref.name] = _finished(todo, suite, registry)
        else:
            for todo in pending:
                _run_rows([todo], registry, options, device)
                runs[todo.ref.name] = _finished(todo, suite, registry)
    return {ref.name: runs[ref.name] for ref, _ in models}


def _run_rows(pending: list[PendingRun], registry: Registry, options: EvalOptions, device: str) -> None:
    """The pending runs' rows run and recorded: as Ray shards, or model by model in this process."""
    if options.sharded:
        run_sharded(pending, registry, options, device)
        return
    for todo in pending:
        run_model_rows(todo.ref, todo.model_hash, todo.rows, batch_size=options.batch_size,
                       max_new_tokens=options.max_new_tokens, device=device, endpoint=options.endpoint,
                       budgets=todo.budgets, on_results=partial(todo.record, registry))


def _finished(todo: PendingRun, suite: Suite, registry: Registry) -> ModelRun:
    registry.finish_run(todo.run_id, [row.id for row in suite.rows])  # refused unless every row has a result
    results = _in_suite_order(registry.results(todo.run_id, todo.ref.name), suite, registry, todo.run_id)
    return ModelRun(todo.ref, todo.role, todo.model_hash, todo.run_id, False, results)


def _open(ref: ModelRef, role: Role, suite: Suite, registry: Registry, options: EvalOptions, device: str,
          bar: Progress) -> ModelRun | PendingRun:
    """A model's cached run, or its opened (or resumed) run with the rows still to run."""
    if ref.is_remote:
        return _open_remote(ref, role, suite, registry, options.max_new_tokens, bar, options.force, options.endpoint)
    return _open_local(ref, role, suite, registry, options.max_new_tokens, bar, options.force, device)


def _open_local(ref: ModelRef, role: Role, suite: Suite, registry: Registry, max_new_tokens: int, bar, force: bool,
                device: str) -> ModelRun | PendingRun:
    """A local model's cached run, or its opened (or resumed) run with the rows still to run."""
    model_hash = registry.register_model(ref.name, local.local_folder(ref), role=role, adapter=ref.adapter)
    config = local.run_config(ref, suite, max_new_tokens=max_new_tokens, device=device)
    return _cached_or_opened(ref, role, model_hash, config, suite, registry, bar, force)


def _open_remote(ref: ModelRef, role: Role, suite: Suite, registry: Registry, max_new_tokens: int, bar, force: bool,
                 settings: EndpointSettings) -> ModelRun | PendingRun:
    """The same for a url model, keyed by what its server reports (evaluate.endpoint): the same registry, cache
    rules and results."""
    prepared = _endpoint.prepare(ref, suite.rows, max_new_tokens, settings)
    model_hash = registry.register_remote(ref.name, str(ref.url), _endpoint.identity_hash(prepared.identity),
                                          role=role, identity=prepared.identity)
    evaluators = evaluator_identity(name for row in suite.rows for name in row.evaluators)
    config = _endpoint.run_config(ref, evaluators, max_new_tokens=max_new_tokens, budget_mode=prepared.budget_mode,
                                  runner_format=local.RUNNER_FORMAT)
    return _cached_or_opened(ref, role, model_hash, config, suite, registry, bar, force, budgets=prepared.budgets)


def _cached_or_opened(ref: ModelRef, role: Role, model_hash: str, config: dict, suite: Suite, registry: Registry,
                      bar, force: bool, budgets: dict[str, int] | None = None) -> ModelRun | PendingRun:
    key = config_hash(config)
    cached = None if force else registry.cached_run(model_hash, suite.sha256, key, [row.id for row in suite.rows])
    if cached is not None:
        results = _in_suite_order(registry.results(cached, ref.name), suite, registry, cached)
        return ModelRun(ref, role, model_hash, cached, True, results)
    run_id = registry.open_run(model_hash, suite.sha256, key, config)
    done = registry.done_rows(run_id)
    advance = bar.task(f"evaluating {ref.name}", len(suite.rows), completed=len(done), unit="rows")
    return PendingRun(ref, role, model_hash, run_id, [row for row in suite.rows if row.id not in done], advance,
                      budgets)


def _in_suite_order(results: list[RowResult], suite: Suite, registry: Registry, run_id: int,
                    cohorts: Sequence[str] | None = None) -> list[RowResult]:
    """One result per suite row (of `cohorts` only, when given), in the suite's order — however the rows were
    batched or stored."""
    rows = [row for row in suite.rows if cohorts is None or row.cohort in cohorts]
    by_id = {r.row_id: r for r in results}
    missing = [row.id for row in rows if row.id not in by_id]
    if missing:
        raise RegistryError(f"registry {registry.path}: run {run_id} has no result for row(s) {missing[:3]}")
    return [by_id[row.id] for row in rows]
