"""What every call of the clients shares: the channel options, the bearer token's metadata, and
a failed call's status raised as its :mod:`steer.errors` class."""

from __future__ import annotations

from typing import Any

import grpc

from steer import errors
from steer.proto.v1 import (
    bake_pb2_grpc,
    directions_pb2_grpc,
    features_pb2_grpc,
    generation_pb2_grpc,
    jobs_pb2_grpc,
    models_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
#: the trailing metadata key of the offending field (steer.errors' one definition)
FIELD_KEY = errors.FIELD_METADATA_KEY

# A failed call raises the steer.errors class of its status (with the server's ``field``, and
# ``code``, the grpc.StatusCode); these names are the same classes, kept for callers of old.

RemoteError = errors.SteerError
InvalidArgument = errors.InvalidArgumentError
NotFound = errors.NotFoundError
FailedPrecondition = errors.FailedPreconditionError
ResourceExhausted = errors.ResourceExhaustedError
AlreadyExists = errors.AlreadyExistsError
Unauthenticated = errors.UnauthenticatedError
Unavailable = errors.UnavailableError
Unimplemented = errors.UnimplementedError
Cancelled = errors.CancelledError
DeadlineExceeded = errors.DeadlineExceededError
Internal = errors.InternalError


def translate(error: grpc.RpcError) -> errors.SteerError:
    """The typed exception for a failed call (``grpc.RpcError`` from a sync or aio call)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    field_name = None
    trailing = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    )
    for key, value in trailing or ():
        if key == errors.FIELD_METADATA_KEY:
            field_name = value if isinstance(value, str) else value.decode()
    message = details or str(code)
    if field_name and message.startswith(f"{field_name}: "):
        message = message.removeprefix(f"{field_name}: ")
    raised = errors.error_for(code.name, message, field=field_name)
    raised.code = code
    return raised


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    module: Any, target: str, root_certificates: bytes | None, max_message_bytes: int
) -> Any:
    """A channel of ``module`` (``grpc`` or ``grpc.aio``): TLS with ``root_certificates``, else
    plain, with messages up to ``max_message_bytes`` either way."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if root_certificates is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates)
        return module.secure_channel(target, credentials, options=options)
    return module.insecure_channel(target, options=options)


class Connection:
    """A channel to a steer server and a stub per service: what both clients are built on.

    ``grpc_module`` is ``grpc`` (the blocking client) or ``grpc.aio`` (the asyncio one).
    """

    grpc_module: Any = grpc

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.channel = open_channel(self.grpc_module, target, root_certificates, max_message_bytes)
        self.target = target
        self.timeout = timeout
        self.metadata = metadata(token)
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._models = models_pb2_grpc.ModelsStub(self.channel)
        self._directions = directions_pb2_grpc.DirectionsStub(self.channel)
        self._bake = bake_pb2_grpc.BakeStub(self.channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self._features = features_pb2_grpc.FeaturesStub(self.channel)
