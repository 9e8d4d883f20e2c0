"""The public API is exactly `mergegate.__all__`, and the core never imports the CLI."""

from __future__ import annotations

import subprocess
import sys
import types

import mergegate


def test_all_names_exist_and_nothing_public_is_missing():
    assert sorted(mergegate.__all__) == mergegate.__all__
    assert sorted(dir(mergegate)) == sorted(set(dir(mergegate)) | set(mergegate.__all__))
    for name in mergegate.__all__:
        assert hasattr(mergegate, name), name
    public = {n for n, v in vars(mergegate).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and n not in {"annotations", "importlib", "TYPE_CHECKING", "Any"}}
    assert public == set(mergegate.__all__) - {"__version__"}


def test_public_objects_present_the_top_level_module():
    for name in mergegate.__all__:
        obj = getattr(mergegate, name)
        if hasattr(obj, "__module__") and callable(obj):
            assert obj.__module__.startswith("mergegate"), name


def test_help_does_not_import_torch():
    code = ("import sys; from mergegate.cli import app; import typer.testing as t; "
            "r = t.CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_core_does_not_import_the_cli():
    code = "import mergegate, sys; print(any(m.startswith(('mergegate.cli', 'typer')) for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_every_public_function_is_fully_annotated():
    """Type hints at every entry point: each parameter and the return of every public function."""
    import inspect

    missing = []
    for name in mergegate.__all__:
        obj = getattr(mergegate, name)
        if not inspect.isfunction(obj):
            continue
        signature = inspect.signature(obj)
        missing += [f"{name}({p.name})" for p in signature.parameters.values()
                    if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert not missing, missing


def test_the_workflow_is_in_the_public_api():
    for stage in ("merge", "evaluate_models", "decide", "release", "gate_release", "Registry", "RolloutPlan",
                  "create_app", "ModelRef"):
        assert stage in mergegate.__all__, stage


def test_the_live_stage_is_in_the_public_api():
    """Deciding from live traffic: the policy's live block and the sequential test's evidence and parameters."""
    from mergegate import gate, live

    for name, module in (("LivePolicy", gate), ("SequentialParams", live), ("CohortEvidence", live),
                         ("CanaryEvidence", live)):
        assert name in mergegate.__all__, name
        assert getattr(mergegate, name) is getattr(module, name)


def test_every_error_class_and_the_builders_are_in_the_public_api():
    """What a user calls (build_moe, export_gguf, the search) and every error class they may catch."""
    from mergegate import errors

    error_classes = {name for name, value in vars(errors).items()
                     if isinstance(value, type) and issubclass(value, Exception)}
    missing = (error_classes | {"build_moe", "export_gguf", "search_merges"}) - set(mergegate.__all__)
    assert not missing
    for name in error_classes:
        assert getattr(mergegate, name) is getattr(errors, name)


def test_the_search_function_is_exported_without_shadowing_its_subpackage():
    """`mergegate.search` stays the subpackage (its modules import as ever); the function is `search_merges`."""
    code = ("import mergegate, types; f = mergegate.search_merges; import mergegate.search.space; "
            "from mergegate.search import search; "
            "assert isinstance(mergegate.search, types.ModuleType) and f is search and mergegate.search_merges is f; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
