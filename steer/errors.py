"""Domain exceptions: the one error catalogue. Each class names the gRPC status code it travels
as (and the client re-raises it from); :data:`HTTP_STATUS` gives the HTTP API's status for it.

Front ends only map: the service turns an exception into (status name, message, field)
(:mod:`steer.service.failures`), gRPC into a ``grpc.StatusCode`` with the field in the trailing
metadata key :data:`FIELD_METADATA_KEY`, HTTP into a status; :mod:`steer.client` raises the class
:func:`error_for` names for the status it receives, so a caller catches the same types either side
of the wire.
"""

from __future__ import annotations

from typing import Any

#: the trailing gRPC metadata key the offending request field travels in
FIELD_METADATA_KEY = "steer-field"


class SteerError(Exception):
    """Base class of every error steer raises on purpose."""

    #: name of the gRPC status code this error travels as
    status_code = "INTERNAL"
    #: the ``grpc.StatusCode`` a client received this error with (set by :mod:`steer.client`;
    #: None for an error raised in this process)
    code: Any = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its field (a job's failure crosses processes in a cluster)
        return (type(self), (self.message,), dict(self.__dict__))

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message


class InvalidArgumentError(SteerError, ValueError):
    """The request itself is wrong (bad dimension, NaN strength, unknown hook name...)."""

    status_code = "INVALID_ARGUMENT"


class NotFoundError(SteerError, LookupError):
    """A named model, artifact or offline package does not exist."""

    status_code = "NOT_FOUND"


class FailedPreconditionError(SteerError):
    """The request is well formed but the system is not in a state to run it."""

    status_code = "FAILED_PRECONDITION"


class ResourceExhaustedError(SteerError):
    """A limit was hit: queue full, prompt too long, out of memory."""

    status_code = "RESOURCE_EXHAUSTED"


class UnsupportedArchitectureError(FailedPreconditionError):
    """The model's architecture has no hook layout; pass one explicitly (see steer.hooks)."""


class UnimplementedError(SteerError):
    """The rpc needs a part of steer this build does not have."""

    status_code = "UNIMPLEMENTED"


class UnavailableError(SteerError):
    """The server is shutting down or the model is being unloaded."""

    status_code = "UNAVAILABLE"


class UnauthenticatedError(SteerError):
    """A missing or wrong bearer token."""

    status_code = "UNAUTHENTICATED"


class AlreadyExistsError(SteerError):
    """The target (artifact, output directory) exists and overwrite was not asked for."""

    status_code = "ALREADY_EXISTS"


class OutputExistsError(AlreadyExistsError, FailedPreconditionError):
    """A bake's output exists and overwrite was not asked for: ``ALREADY_EXISTS`` on the wire, a
    :class:`FailedPreconditionError` for library callers (what they caught before)."""


class CancelledError(SteerError):
    """Work stopped because it was cancelled; nothing was written. The one cancellation error:
    a bake or a direction computation whose caller set its ``cancelled`` event (a job's Cancel),
    a call the client cancelled (or went away from) before the server ran it, and a call a client
    sees cancelled."""

    status_code = "CANCELLED"


class DeadlineExceededError(SteerError):
    """The call's deadline passed before the server answered (raised by the client only)."""

    status_code = "DEADLINE_EXCEEDED"


class InternalError(SteerError):
    """The server failed in a way that is not the request's fault (see its log's incident)."""

    status_code = "INTERNAL"


def within(error: SteerError, prefix: str) -> InvalidArgumentError:
    """``error``, raised by a part of a request, as the request's INVALID_ARGUMENT error: its field
    named from the request's top (``prefix.field``, or ``prefix`` when it named none)."""
    field = f"{prefix}.{error.field}" if error.field else prefix
    return InvalidArgumentError(error.message, field=field)


#: the class a status name is raised as; a status not listed is raised as :class:`SteerError`
_BY_STATUS: dict[str, type[SteerError]] = {
    cls.status_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        AlreadyExistsError,
        UnauthenticatedError,
        UnavailableError,
        UnimplementedError,
        CancelledError,
        DeadlineExceededError,
        InternalError,
    )
}


def error_for(status: str, message: str, *, field: str | None = None) -> SteerError:
    """The exception a status name stands for (a client re-raising what a server sent)."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message, field=field)
    error = SteerError(message, field=field)
    error.status_code = status  # a code steer never sends (DATA_LOSS, ...): kept as it came
    return error


#: Every status code an error travels as, and its HTTP status: the one catalogue both front ends
#: map errors with (gRPC uses the code itself; the HTTP API the status, as grpc-gateway does).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
}
