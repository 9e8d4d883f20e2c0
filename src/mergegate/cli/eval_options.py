"""The evaluation flags `evaluate`, `gate`, `release` and `search` share, declared once: a command decorated with
`takes_eval_options` gains them and is called with the one EvalOptions they make (a refused value: one line on
stderr naming it, exit 2, before the command does anything)."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer

_FLAG = inspect.Parameter.POSITIONAL_OR_KEYWORD
FLAGS = [
    inspect.Parameter("batch_size", _FLAG, annotation=int, default=typer.Option(32, help="Rows generated together.")),
    inspect.Parameter("max_new_tokens", _FLAG, annotation=int, default=typer.Option(64, help="Longest completion.")),
    inspect.Parameter("device", _FLAG, annotation=Optional[str], default=typer.Option(
        None, help="Where models run: cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu; bf16 on "
                   "CUDA, fp32 on CPU).")),
    inspect.Parameter("endpoint_concurrency", _FLAG, annotation=int, default=typer.Option(
        8, help="Requests in flight per url model (NAME=http://...).")),
    inspect.Parameter("endpoint_timeout", _FLAG, annotation=float, default=typer.Option(
        60.0, help="Seconds one request to a url model may take, in (0, 3600].")),
    inspect.Parameter("endpoint_retries", _FLAG, annotation=int, default=typer.Option(
        4, help="Retries after a url model's failed request (0 to 20).")),
    inspect.Parameter("api_key_env", _FLAG, annotation=Optional[str], default=typer.Option(
        None, help="Environment variable holding the API key sent to url models as a bearer token.")),
    inspect.Parameter("workers", _FLAG, annotation=Optional[int], default=typer.Option(
        None, help="Ray workers running shards of rows x models in parallel (needs the ray extra; default: this "
                   "process, no Ray); mergegate starts and stops a local Ray.")),
    inspect.Parameter("ray_address", _FLAG, annotation=Optional[str], default=typer.Option(
        None, help="Ray cluster to run the shards on (e.g. ray://HEAD:10001, or auto); --workers then defaults to "
                   "its CPUs (GPUs on CUDA).")),
]
SHARDING = ("workers", "ray_address")  # left out where a command's own --ray-address means something else


def eval_options_from(*, batch_size: int, max_new_tokens: int, device: str | None, endpoint_concurrency: int,
                      endpoint_timeout: float, endpoint_retries: int, api_key_env: str | None,
                      workers: int | None = None, ray_address: str | None = None):
    """The flags' EvalOptions; a value it refuses exits 2 with its one-line reason."""
    from ..errors import MergegateError
    from ..evaluate import EvalOptions
    from ..model_ref import EndpointSettings
    from .refusal import refuse

    try:
        endpoint = EndpointSettings(concurrency=endpoint_concurrency, timeout_s=endpoint_timeout,
                                    retries=endpoint_retries, api_key_env=api_key_env)
        return EvalOptions(batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, endpoint=endpoint,
                           workers=workers, ray_address=ray_address)
    except MergegateError as exc:
        refuse(exc)


def takes_eval_options(*, sharding: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command that takes `eval_options` (an EvalOptions): typer sees the shared flags in its place
    (`--workers` and `--ray-address` only with `sharding`)."""
    flags = [flag for flag in FLAGS if sharding or flag.name not in SHARDING]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command)
        # the command's own annotations resolved, as typer reads them (`eval_options`'s, replaced by the flags, is
        # imported for the type checker only)
        hints = typing.get_type_hints(command, localns={"EvalOptions": Any})
        kept = [param.replace(annotation=hints[name]) for name, param in own.parameters.items()
                if name != "eval_options"]

        @functools.wraps(command)
        def with_options(**given: Any) -> Any:
            values = {flag.name: given.pop(flag.name) for flag in flags}
            return command(**given, eval_options=eval_options_from(**values))

        signature = own.replace(parameters=[*kept, *flags])
        with_options.__signature__ = signature  # type: ignore[attr-defined]
        with_options.__annotations__ = {name: param.annotation for name, param in signature.parameters.items()}
        return with_options

    return decorate
