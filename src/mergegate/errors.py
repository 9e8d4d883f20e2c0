"""Errors mergegate raises on purpose. Each names the file, tensor or field at fault."""


class MergegateError(Exception):
    """Base class: an input was refused. The CLI maps it to exit code 2."""


class RecipeError(MergegateError, ValueError):
    """The recipe is malformed: an unknown key, a bad value, a missing parameter."""


class CheckpointError(MergegateError):
    """A model folder cannot be read safely: missing files, a corrupt header, pickle weights."""


class IncompatibleModels(MergegateError):
    """The sources cannot be merged with each other: architecture, tensors, tokenizer or values differ."""
