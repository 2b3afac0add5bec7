"""What went wrong, in words both front ends send: a domain exception -> (status name, message,
field), never a stack trace.

* :class:`steer.errors.SteerError` subclasses give their ``status_code``,
* ``torch.OutOfMemoryError`` / ``MemoryError`` give ``RESOURCE_EXHAUSTED``,
* anything else gives ``INTERNAL`` with an incident id (the traceback goes to the server log).

gRPC turns the name into a ``grpc.StatusCode`` (:mod:`steer.server.status`), HTTP into a status
(:data:`steer.errors.HTTP_STATUS`); job failures keep the name.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch

from steer.errors import SteerError

log = logging.getLogger("steer.server")

#: longest message and field name sent back: a client's 10,000-character id echoed in the
#: details would overflow gRPC's metadata limit and turn the error into another one
MAX_MESSAGE = 2000
MAX_FIELD = 200


@dataclass(frozen=True)
class Failure:
    """One error as a client sees it."""

    #: the gRPC status name ("INVALID_ARGUMENT", "NOT_FOUND", ...)
    code: str
    #: the message, prefixed with the field when there is one, clipped to MAX_MESSAGE
    message: str
    #: the offending request field, clipped to MAX_FIELD; None if not one field's fault
    field: str | None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 16]}... ({len(text)} chars)"


def describe(error: BaseException) -> Failure:
    """The :class:`Failure` for an exception raised while serving."""
    if isinstance(error, SteerError):
        field = _clip(error.field, MAX_FIELD) if error.field else error.field
        text = f"{field}: {error.message}" if field else error.message
        return Failure(error.status_code, _clip(text, MAX_MESSAGE), field)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return Failure(
            "RESOURCE_EXHAUSTED",
            "out of memory while running this request; try fewer tokens or a smaller batch",
            None,
        )
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=error)
    return Failure("INTERNAL", f"internal error (incident {incident}; see server log)", None)
