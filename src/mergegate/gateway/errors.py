"""Errors: `APIError` becomes an OpenAI-style error response; `BackendError` is one backend call failing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class APIError(Exception):
    """A request the gateway answers with `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError, messages: dict[str, str] | None = None) -> APIError:
    """A body that failed its schema as OpenAI's 400: the first problem's parameter and what is wrong with it
    (`messages` replaces the wording for a parameter), and how many more there are."""
    from .._yaml import error_message

    errors = exc.errors()
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = (messages or {}).get(param or "", error_message(first))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"Invalid value for '{param}': {message}{more}.", param=param, code="invalid_value")


class BackendError(Exception):
    """A backend call failed. `kind` is the low-cardinality reason used in metrics and fallback decisions:
    timeout | unavailable | http_error | bad_response | overloaded | rejected | loop | internal.

    `counts_as_failure` says whether it speaks about the backend's health (the circuit breaker counts it):
    load (`overloaded`) and requests the backend refuses as invalid (`rejected`) do not."""

    kind = "internal"
    counts_as_failure = True  # for the circuit breaker

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def error_type(self) -> str:
        """OpenTelemetry `error.type`: the HTTP status for upstream HTTP errors, else the kind."""
        return str(self.status) if self.status else self.kind


class BackendTimeout(BackendError):
    kind = "timeout"


class BackendUnavailable(BackendError):
    kind = "unavailable"  # could not connect, connection dropped


class BackendHTTPError(BackendError):
    kind = "http_error"


class BackendBadResponse(BackendError):
    kind = "bad_response"  # not JSON, or not an OpenAI-shaped answer


class BackendOverloaded(BackendError):
    kind = "overloaded"
    counts_as_failure = False  # a full queue (or an upstream's 429) says nothing about the backend's health


class BackendLoop(BackendError):
    """The upstream is this gateway again (it answered 508, loop detected: hops.py): a plan's url leads back here.
    A configuration error answered at once, not ill health: the breaker does not count it."""

    kind = "loop"
    counts_as_failure = False


class BackendRejected(BackendError):
    """The backend refused this request as invalid (a parameter it cannot take, an upstream's 400/413/422):
    the request's fault, not the backend's, so the breaker does not count it."""

    kind = "rejected"
    counts_as_failure = False
