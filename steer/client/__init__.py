"""Python clients for the steer gRPC service: :class:`SteerClient` (sync) and
:class:`AsyncSteerClient` (asyncio).

Status codes come back as the :mod:`steer.errors` classes themselves (``InvalidArgument`` is
another name of :class:`~steer.errors.InvalidArgumentError`), with the server's ``field``.
Interventions are built with :func:`ablate`, :func:`add`, :func:`add_local`, :func:`slider`
(an SAE feature of an SAE loaded with ``load_sae``), :func:`gated` (one of them only where a
direction's projection passes a threshold) and :func:`feature_gated` (only where an SAE feature
is active)::

    with SteerClient("127.0.0.1:50051") as client:
        for event in client.generate("Tell me a story", interventions=[add("calm", 4.0)]):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

from steer.client.aio import AsyncSteerClient
from steer.client.calls import (
    DEFAULT_TARGET,
    FIELD_KEY,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    translate,
)
from steer.client.interventions import (
    ablate,
    add,
    add_local,
    feature_gated,
    gated,
    inline_vector,
    slider,
)
from steer.client.messages import feature_info_request, generate_request, load_sae_request
from steer.client.results import Completion, GenerateEvent
from steer.client.sync import SteerClient

__all__ = [
    "DEFAULT_TARGET",
    "FIELD_KEY",
    "AlreadyExists",
    "AsyncSteerClient",
    "Cancelled",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateEvent",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "RemoteError",
    "ResourceExhausted",
    "SteerClient",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "ablate",
    "add",
    "add_local",
    "feature_gated",
    "feature_info_request",
    "gated",
    "generate_request",
    "inline_vector",
    "load_sae_request",
    "slider",
    "translate",
]
