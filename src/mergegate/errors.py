"""Errors mergegate raises on purpose. Each names the file, tensor or field at fault.

Every refusal of user input derives from MergegateError, so `from mergegate.errors import X` finds all of
them and the CLI maps any of them to exit code 2. The gateway's HTTP-level errors (`gateway/errors.py`:
APIError, BackendError and its kinds) are not here: they are responses to requests and failures of upstream
servers while serving, never refusals of a command's input.
"""


class MergegateError(Exception):
    """Base class: an input was refused. The CLI maps it to exit code 2."""


class RecipeError(MergegateError, ValueError):
    """The recipe is malformed: an unknown key, a bad value, a missing parameter."""


class CheckpointError(MergegateError):
    """A model folder cannot be read safely: missing files, a corrupt header, pickle weights."""


class MoEConfigError(RecipeError):
    """A mixture-of-experts config (`mergegate moe`) is malformed: an unknown key, too few experts or prompts, a
    prompt the base's tokenizer cannot encode. A RecipeError, so callers catching recipe errors catch it."""


class IncompatibleModels(MergegateError):
    """The sources cannot be merged with each other: architecture, tensors, tokenizer or values differ."""


class GGUFExportError(MergegateError):
    """A model cannot be exported to GGUF: another architecture, an unknown tensor, a tokenizer GGUF cannot hold."""


class SuiteError(MergegateError, ValueError):
    """An eval suite file is malformed."""


class EvaluationError(MergegateError, ValueError):
    """An evaluation cannot run as asked: a bad setting, a missing or unloadable model."""


class RegistryError(MergegateError):
    """The registry file cannot be opened or used, or a run is incomplete."""


class PolicyError(MergegateError, ValueError):
    """A gate policy is malformed."""


class PlanError(MergegateError, ValueError):
    """A rollout plan is malformed or refers to an unknown model."""


class ModelRefError(MergegateError, ValueError):
    """A model reference (PATH, NAME=PATH, PATH+ADAPTER, NAME=URL#served-name) cannot be read."""


class MergeOptionsError(MergegateError, ValueError):
    """A merge option is refused. `option` is the MergeOptions field and `problem` what is wrong with it, so the
    CLI can name its own flag (`--shard-size: ...`) where the library names the field (`shard size: ...`)."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(option.replace("_", " ") + problem)

    def __reduce__(self):  # pickles with both arguments (the default passes only the message)
        return type(self), (self.option, self.problem)


class CandidateServerError(MergegateError):
    """The server started for a release's candidate (`--serve-candidate`) could not be started or never got ready."""


class SearchSpaceError(MergegateError, ValueError):
    """A search space is malformed: a bad range or choice, a parameter no method in the space declares."""


class SearchError(MergegateError):
    """A search cannot run: overlapping dev and held-out suites, an output folder holding another search."""


class AddressError(MergegateError, ValueError):
    """A url or a port is refused: not http(s), no host, a port out of range, a port already in use."""


class GGUFImportError(MergegateError):
    """A GGUF file cannot be turned into a model folder: unreadable, or an architecture transformers cannot load."""
