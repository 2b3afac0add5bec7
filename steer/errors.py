"""Domain exceptions: the one error catalogue. Each class names the gRPC status code it travels
as (and the client re-raises it from); :data:`HTTP_STATUS` gives the HTTP API's status for it."""

from __future__ import annotations


class SteerError(Exception):
    """Base class of every error steer raises on purpose."""

    #: name of the gRPC status code this error travels as
    status_code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

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


class ClientCancelledError(SteerError):
    """The client cancelled the call (or went away) before the server ran it."""

    status_code = "CANCELLED"


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
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
}
