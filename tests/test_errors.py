"""Every refusal of user input is a MergegateError defined in mergegate.errors, the one place to import it from."""

import pytest

from mergegate import errors
from mergegate.evaluate.runner import EvaluationError
from mergegate.evaluate.suite import SuiteError
from mergegate.gate import PolicyError
from mergegate.registry import RegistryError
from mergegate.rollout import PlanError


@pytest.mark.parametrize("raised_by", [SuiteError, EvaluationError, PolicyError, PlanError, RegistryError])
def test_errors_raised_by_modules_are_the_ones_in_errors(raised_by):
    assert getattr(errors, raised_by.__name__) is raised_by
    assert issubclass(raised_by, errors.MergegateError)


def test_every_error_class_derives_from_mergegate_error():
    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    assert len(classes) >= 9
    assert all(issubclass(cls, errors.MergegateError) for cls in classes)
    # the ones callers catch as ValueError keep that base
    assert all(issubclass(cls, ValueError) for cls in (errors.RecipeError, errors.SuiteError,
                                                      errors.EvaluationError, errors.PolicyError, errors.PlanError))


def test_every_refusal_class_is_defined_in_errors_and_importable_where_it_is_raised():
    """No module defines its own MergegateError: a class deriving from one of errors' classes lives there."""
    import ast
    from pathlib import Path

    package = Path(errors.__file__).parent
    refusal_names = {name for name, value in vars(errors).items()
                     if isinstance(value, type) and issubclass(value, errors.MergegateError)}
    defined_elsewhere = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(errors.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases}
                if bases & refusal_names:
                    defined_elsewhere.append(f"{path.relative_to(package)}: {node.name}")
    assert not defined_elsewhere


def test_export_and_moe_refusals_are_errors_classes():
    from mergegate.export import GGUFExportError as exported
    from mergegate.export.gguf import GGUFExportError as raised

    assert raised is exported is errors.GGUFExportError
    assert issubclass(errors.GGUFExportError, errors.MergegateError)
    assert issubclass(errors.MoEConfigError, errors.RecipeError)  # callers catching RecipeError still catch it
