"""steer.errors is the one error catalogue: the client raises its classes themselves, one class
means cancelled wherever the work was, and the service core maps errors without grpc."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from steer import errors
from steer.client import translate


class _Failed(grpc.RpcError):
    """A failed call as grpc raises it: a status code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None) -> None:
        self._code, self._details = code, details
        self._trailing = ((errors.FIELD_METADATA_KEY, field),) if field else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.UnimplementedError),
        (grpc.StatusCode.CANCELLED, errors.CancelledError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
    ],
)
def test_the_client_raises_the_catalogue_classes_themselves(
    code: grpc.StatusCode, cls: type[errors.SteerError]
) -> None:
    error = translate(_Failed(code, "sampling.top_p: must be in (0, 1]", "sampling.top_p"))
    assert type(error) is cls  # not a client-side mirror of it
    assert error.status_code == code.name and error.code is code
    assert error.field == "sampling.top_p" and error.message == "must be in (0, 1]"


def test_one_cancellation_class() -> None:
    from steer.bake import BakeCancelled
    from steer.directions.api import CancelledError

    assert BakeCancelled is errors.CancelledError
    assert CancelledError is errors.CancelledError
    assert errors.CancelledError.status_code == "CANCELLED"


def test_every_status_the_catalogue_raises_has_an_http_status() -> None:
    pending = [errors.SteerError]
    while pending:
        cls = pending.pop()
        assert cls.status_code in errors.HTTP_STATUS, cls
        pending.extend(cls.__subclasses__())


def test_an_unknown_status_keeps_its_name() -> None:
    error = errors.error_for("DATA_LOSS", "lost", field="x")
    assert type(error) is errors.SteerError
    assert error.status_code == "DATA_LOSS" and str(error) == "x: lost"
    assert errors.SteerError.status_code == "INTERNAL"  # the class itself is untouched


def test_the_service_core_maps_errors_without_grpc() -> None:
    code = (
        "import sys, steer.service.scheduler, steer.service.core, steer.service.failures; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'grpc'], 'grpc loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
