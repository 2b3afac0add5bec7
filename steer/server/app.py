""":class:`SteerServer`: gRPC (every service, health, reflection) and HTTP on one event loop.

Services are registered from their proto descriptors: each rpc named in a ``service`` block is
served by the servicer method of the same name, wrapped by :func:`~steer.server.status.guard`.
Adding an rpc is: declare it in the proto, regenerate the stubs, add the method.

The server is ``grpc.aio`` on an event loop thread of its own. An open stream is a coroutine
waiting on its subscription, not a thread, so a client holding hundreds of streams costs memory
and queue places, never the threads that health checks and other rpcs need; the per-model queue
limit (``max_waiting``) is what refuses, with RESOURCE_EXHAUSTED. Blocking unary rpcs run in the
loop's default executor (``worker_threads`` threads).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from steer.models import ModelHandle
from steer.proto.v1 import (
    bake_pb2,
    directions_pb2,
    features_pb2,
    generation_pb2,
    jobs_pb2,
    models_pb2,
)
from steer.server.auth import TokenAuthInterceptor
from steer.server.servicers import (
    BakeServicer,
    DirectionsServicer,
    FeaturesServicer,
    GenerationServicer,
    JobsServicer,
    ModelsServicer,
)
from steer.server.status import Malformed, guard
from steer.service.core import ServiceCore
from steer.service.jobs import Jobs
from steer.service.settings import ServerSettings
from steer.service.sliders import SliderCatalogue

log = logging.getLogger("steer.server")

#: steer's gRPC services: (module of the generated stubs, service name)
SERVICES: list[tuple[ModuleType, str]] = [
    (generation_pb2, "Generation"),
    (models_pb2, "Models"),
    (features_pb2, "Features"),
    (directions_pb2, "Directions"),
    (bake_pb2, "Bake"),
    (jobs_pb2, "Jobs"),
]


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as error:  # protobuf raises DecodeError and others
            return Malformed(error)

    return deserialize


def service_handler(module: ModuleType, name: str, servicer: object) -> grpc.GenericRpcHandler:
    """A handler serving every rpc of ``module``'s service ``name`` from ``servicer``."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = guard(getattr(servicer, method.name), streaming=method.server_streaming)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behaviour,
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def health_handler(servicer: health.aio.HealthServicer) -> grpc.GenericRpcHandler:
    """The standard health service, with steer's tolerant deserializer: bytes that do not parse
    are INVALID_ARGUMENT, as on every other service (grpc's own registration answers UNKNOWN)."""
    deserialize = _deserializer(health_pb2.HealthCheckRequest)
    serialize = health_pb2.HealthCheckResponse.SerializeToString

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Malformed):
            message = f"the request does not parse: {request.error}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(request, context)
        return await servicer.Check(request, context)

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse(request, context)
        await servicer.Watch(request, context)

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(check, deserialize, serialize),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, deserialize, serialize),
    }
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers)


def _tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket made with IPPROTO_TCP, as asyncio's own are: asyncio sets TCP_NODELAY
    only on connections whose socket says TCP, and without it every answer on a kept-alive
    connection and every SSE chunk waits for the client's delayed ACK (about 40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> int:
    address = settings.address
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


class SteerServer:
    """The service. Construct with already loaded models (tests) or load them by name.

    >>> server = SteerServer(ServerSettings(port=0), models={"tiny": handle})
    >>> port = server.start()
    ...
    >>> server.stop()
    """

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        models: Mapping[str, ModelHandle] | None = None,
        sliders: SliderCatalogue | None = None,
        jobs: Jobs | None = None,
    ) -> None:
        self.settings = settings or ServerSettings()
        self.core = ServiceCore.create(self.settings, models, sliders, jobs)
        self.registry, self.store, self.saes = self.core.registry, self.core.store, self.core.saes
        self.jobs, self.draining = self.core.jobs, self.core.draining
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        #: the bound port of the HTTP API, when settings.http_port is set
        self.http_port: int | None = None
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def load(self, source: str, model_id: str = "", *, dtype: str = "", device: str = "") -> str:
        """Load a model before or while serving; returns its id."""
        return self.registry.load(source, model_id, dtype, device).model_id

    def _services(self) -> list[tuple[ModuleType, str, object]]:
        core, settings = self.core, self.settings
        servicers: dict[str, object] = {
            "Generation": GenerationServicer(core),
            "Models": ModelsServicer(core),
            "Features": FeaturesServicer(self.registry, self.saes, settings),
            "Directions": DirectionsServicer(self.registry, self.store, self.jobs, settings),
            "Bake": BakeServicer(self.jobs, settings, self.registry, self.saes),
            "Jobs": JobsServicer(self.jobs),
        }
        return [(module, name, servicers[name]) for module, name in SERVICES]

    def start(self) -> int:
        """Bind and start serving on an event loop thread of its own; returns the bound port."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="steer-grpc-loop", daemon=True)
        thread.start()
        self._loop, self._loop_thread = loop, thread
        try:
            port = asyncio.run_coroutine_threadsafe(self._start(), loop).result()
        except BaseException:
            self._close_loop()
            raise
        log.info("serving on %s:%d", self.settings.host, port)
        return port

    async def _start(self) -> int:
        settings = self.settings
        # blocking unary rpcs (file I/O, tokenising, loading) run here; streams hold no thread
        asyncio.get_running_loop().set_default_executor(
            futures.ThreadPoolExecutor(
                max_workers=settings.worker_threads, thread_name_prefix="steer-rpc"
            )
        )
        interceptors = [TokenAuthInterceptor(settings.token)] if settings.token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        names = []
        for module, name, servicer in self._services():
            server.add_generic_rpc_handlers((service_handler(module, name, servicer),))
            names.append(module.DESCRIPTOR.services_by_name[name].full_name)
        server.add_generic_rpc_handlers((health_handler(self.health),))
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        port = _bind(server, settings)
        await server.start()
        self._server, self.port = server, port
        if settings.http_port is not None:
            await self._start_http()
        return port

    async def _start_http(self) -> None:
        """The OpenAI-compatible HTTP API on this loop (imported only when it is on)."""
        import uvicorn

        from steer.http.app import create_app

        settings = self.settings
        listener = _tcp_listener(settings.host, settings.http_port or 0)
        config = uvicorn.Config(
            create_app(self.core),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(http.serve(sockets=[listener]))
        while not http.started and not self._http_task.done():
            await asyncio.sleep(0.01)
        if self._http_task.done():
            self._http_task.result()  # raises why it stopped
            raise OSError(f"the HTTP API did not start on port {settings.http_port}")
        self._http, self.http_port = http, listener.getsockname()[1]

    async def _stop_http(self) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
            self._http = self._http_task = None

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1`` is what OpenAI clients take)."""
        return f"http://{self.settings.host}:{self.http_port}"

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, no new streams, open ones get ``grace`` s."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.draining.set()
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), loop).result()
        self.core.close(grace)
        if loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._stop_http(), loop).result()
            asyncio.run_coroutine_threadsafe(self._server.stop(1.0), loop).result()
            self._server = None
        self._close_loop()

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._loop_thread = None
        self._stopped.set()

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        if self._loop is not None:
            self._stopped.wait()

    def __enter__(self) -> SteerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0.5)
