"""The cluster's gRPC endpoint: steer's own gRPC API, forwarded to the replicas.

Each replica runs steer's real gRPC server (:class:`steer.server.SteerServer`, on loopback),
and the router runs this endpoint: every rpc of steer's services is taken as raw bytes, routed
by its model (``model`` / ``model_id``, or the model of a configured ``sae_id``) through Ray
Serve's multiplexing to a replica that holds that model, and relayed there to the replica's
server; replies and errors (status, details, the ``steer-field`` trailer) come back unchanged.
So the cluster answers exactly what one server answers, with the same validation, errors and
auth, and nothing in steer's servicers had to be written twice. (Ray Serve's own gRPC proxy
would have needed each rpc rewritten as a deployment method with Ray's context.)

What a cluster fixes in its deployment file is refused here: ``Models.Load`` / ``Unload`` and
``Features.LoadSae`` / ``UnloadSae`` (FAILED_PRECONDITION). ``Models.List`` asks each configured
model's replica for its ``Info``. Requests without a model (artifacts, jobs, bakes) go to any
replica: artifacts live on the shared models root, jobs in the shared job table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2

from steer.cluster.config import ClusterConfig
from steer.errors import FIELD_METADATA_KEY
from steer.proto.v1 import models_pb2
from steer.server.app import SERVICES, health_handler
from steer.service.auth import bearer_matches

_FIXED_MODELS = "in a cluster the models are named in the deployment file ([models.ID])"
_FIXED_SAES = "in a cluster the SAEs are named in the deployment file ([saes.ID])"
REFUSED = {
    "/steer.v1.Models/Load": _FIXED_MODELS,
    "/steer.v1.Models/Unload": _FIXED_MODELS,
    "/steer.v1.Features/LoadSae": _FIXED_SAES,
    "/steer.v1.Features/UnloadSae": _FIXED_SAES,
}
LIST_MODELS = "/steer.v1.Models/List"
MODEL_INFO = "/steer.v1.Models/Info"
#: metadata a client's call carries that is the transport's, not the rpc's
_TRANSPORT_KEYS = ("user-agent", "te", "content-type")


def passed_metadata(metadata: Any) -> tuple[tuple[str, str], ...]:
    """The client's metadata worth passing on (auth, its own keys), not gRPC's own."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith((":", "grpc-")) and key not in _TRANSPORT_KEYS
    )


async def relay(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    metadata: tuple[tuple[str, str], ...],
    streaming: bool,
) -> AsyncIterator[Any]:
    """The replica's side: call ``method`` on its own server; yield the replies as bytes, or
    one ("error", status name, details, trailing metadata) tuple."""
    try:
        if streaming:
            async for reply in channel.unary_stream(method)(request, metadata=metadata):
                yield reply
        else:
            yield await channel.unary_unary(method)(request, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        trailing = tuple(error.trailing_metadata() or ())
        yield ("error", error.code().name, error.details() or "", trailing)


class GrpcIngress:
    """The router's gRPC server; ``replicas`` is the replica deployment's handle."""

    def __init__(self, replicas: Any, config: ClusterConfig) -> None:
        self.replicas, self.config = replicas, config
        self.token: str | None = config.server.get("token")
        self.server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind ``[cluster] host:grpc_port`` and serve; returns the port."""
        limit = int(self.config.server.get("max_message_bytes", 64 * 1024 * 1024))
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        for module, name in SERVICES:
            server.add_generic_rpc_handlers((self._service(module, name),))
        checker = health.aio.HealthServicer()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        server.add_generic_rpc_handlers((health_handler(checker),))
        port = server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        if port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.grpc_port}")
        await server.start()
        self.server = server
        return port

    def _service(self, module: ModuleType, name: str) -> grpc.GenericRpcHandler:
        service = module.DESCRIPTOR.services_by_name[name]
        handlers = {}
        for method in service.methods:
            handlers[method.name] = self._method(
                f"/{service.full_name}/{method.name}",
                message_factory.GetMessageClass(method.input_type),
                method.server_streaming,
            )
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _method(self, method: str, request_class: Any, streaming: bool) -> grpc.RpcMethodHandler:
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            async for reply in self._forward(method, request_class, request, context, False):
                return bytes(reply)
            raise AssertionError("a unary rpc answered nothing")

        async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for reply in self._forward(method, request_class, request, context, True):
                yield reply

        if streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)

    async def _forward(
        self,
        method: str,
        request_class: Any,
        request: bytes,
        context: grpc.aio.ServicerContext,
        streaming: bool,
    ) -> AsyncIterator[bytes]:
        metadata = passed_metadata(context.invocation_metadata())
        if self.token and not bearer_matches(dict(metadata).get("authorization", ""), self.token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if method in REFUSED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, REFUSED[method])
        if method == LIST_MODELS:
            yield await self._list_models(metadata, context)
            return
        try:
            message = request_class.FromString(request)
        except Exception as error:  # protobuf raises DecodeError and others
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {error}"
            )
        model, request = await self._route(message, request, context)
        async for reply in self._call(model, method, request, metadata, streaming, context):
            yield reply

    async def _route(
        self, message: Any, request: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[str | None, bytes]:
        """The model a request goes to (None: any replica), and the request with the default
        model filled in (a replica's own default is whichever model it loaded first)."""
        config = self.config
        names = message.DESCRIPTOR.fields_by_name
        key = "model" if "model" in names else "model_id" if "model_id" in names else None
        if key is not None:
            model = getattr(message, key) or config.default_model
            if model not in config.models:
                known = ", ".join(config.models)
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"{key}: model {model!r} is not served here; models: {known}",
                    trailing_metadata=((FIELD_METADATA_KEY, key),),
                )
            if not getattr(message, key):
                setattr(message, key, model)
                request = message.SerializeToString()
            return model, request
        sae = config.saes.get(message.sae_id) if "sae_id" in names else None
        return (sae.model if sae is not None else None), request

    async def _call(
        self,
        model: str | None,
        method: str,
        request: bytes,
        metadata: tuple[tuple[str, str], ...],
        streaming: bool,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        options: dict[str, Any] = {"stream": True}
        if model is not None:
            options["multiplexed_model_id"] = model
        replies = self.replicas.options(**options).grpc.remote(method, request, metadata, streaming)
        try:
            async for reply in replies:
                if isinstance(reply, tuple):
                    _, status, details, trailing = reply
                    await context.abort(
                        grpc.StatusCode[status], details, trailing_metadata=trailing
                    )
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # the replica died (RayActorError) or could not be reached
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the replica serving this call stopped ({type(error).__name__}); retry",
            )

    async def _list_models(
        self, metadata: tuple[tuple[str, str], ...], context: grpc.aio.ServicerContext
    ) -> bytes:
        listed = models_pb2.ListModelsResponse(default_model=self.config.default_model)
        for model in self.config.models:
            request = models_pb2.ModelInfoRequest(model_id=model).SerializeToString()
            async for reply in self._call(model, MODEL_INFO, request, metadata, False, context):
                listed.models.append(models_pb2.ModelInfo.FromString(reply))
        return listed.SerializeToString()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(1.0)
            self.server = None
