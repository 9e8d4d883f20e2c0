"""Where tensors go: one parser of device names for merging and evaluation (and the gateway's local models).

A device is "cpu", "cuda" or "cuda:N", and a CUDA device must be one torch sees here. Each caller raises its own
error class (MergeOptionsError, EvaluationError) with the problem this module phrases, so a merge and an
evaluation refuse the same value in the same words. torch is imported only when a device is checked.
"""

from __future__ import annotations

DEVICE_FORMS = "cpu, cuda or cuda:N"


def device_problem(device: object) -> str | None:
    """What is wrong with `device`, phrased to follow the word "device" (" must be cpu, cuda or cuda:N, got
    'tpu'"; " 'cuda': no CUDA GPU is available to torch here ..."), or None when it is a device this machine has."""
    if not isinstance(device, str):
        return f" must be {DEVICE_FORMS}, got {device!r}"
    if device == "cpu":
        return None
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not (index.isascii() and index.isdigit())):
        return f" must be {DEVICE_FORMS}, got {device!r}"
    import torch

    if not torch.cuda.is_available():
        return (f" {device!r}: no CUDA GPU is available to torch here (torch.cuda.is_available() is false); "
                "use cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f" {device!r}: torch sees {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})"
    return None


def default_device() -> str:
    """Where models run when no device is given: "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: object, error_cls: type[Exception]) -> str:
    """`device` when this machine has it; else `error_cls` with one line saying why (see `device_problem`)."""
    problem = device_problem(device)
    if problem is not None:
        raise error_cls(f"device{problem}")
    return str(device)
