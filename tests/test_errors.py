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
