"""steer as a Ray Serve application: HTTP and gRPC endpoints in front of service-core replicas.

* ``SteerReplica`` (``num_replicas`` or autoscaled) runs steer's own server
  (:class:`steer.server.SteerServer`, gRPC on loopback) with the configured backend, and answers
  the OpenAI-compatible API by running steer's HTTP app (:func:`steer.http.app.create_app`) on
  the same service core for each request it is handed. Models (and the SAEs configured for them)
  load on demand with Ray Serve's model multiplexing (``max_models_per_replica``, least recently
  used unloaded first), so one endpoint serves several merges.
* ``SteerRouter`` is the ingress: over HTTP it reads the request's ``model``, sends the request
  to a replica with ``multiplexed_model_id`` set to it (Ray Serve prefers replicas that hold that
  model) and streams the replica's response back unchanged; over gRPC
  (:mod:`steer.cluster.grpc_ingress`) it does the same with steer's gRPC rpcs.
* ``SteerJobs`` holds the job table every replica shares; each job runs as a Ray task
  (:mod:`steer.cluster.jobs`).

Steering state comes from the shared ``models_root`` every replica mounts (artifacts, slider
files, SAEs, each checked against the model's weight hash); a replica that cannot find what a
request names answers with the same NOT_FOUND error as a single server, never unsteered text.
A replica that dies fails only the streams it was serving; Ray Serve starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from steer.cluster.config import ClusterConfig
from steer.cluster.jobs import JobsBody

#: response header naming the replica that answered
REPLICA_HEADER = "x-steer-replica"


class _Held:
    """A model a replica holds for Ray Serve's multiplexing; unloaded with its SAEs when Ray
    evicts it (so loading it again loads them again)."""

    def __init__(self, core: Any, model_id: str) -> None:
        self.core, self.model_id = core, model_id

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # already gone (the replica is shutting down)
            unloaded = self.core.registry.unload(self.model_id, grace=0.0)
            self.core.saes.forget_model(unloaded.handle)


class ReplicaBody:
    """The replica's logic (wrapped as a Ray Serve deployment by :func:`build_app`)."""

    def __init__(self, config: dict[str, Any], jobs: Any) -> None:
        from ray import serve

        from steer.cluster.jobs import RemoteJobs
        from steer.http.app import create_app
        from steer.server import SteerServer

        self.config = ClusterConfig.from_dict(config)
        settings = replace(self.config.server_settings(), host="127.0.0.1", port=0)
        self.server = SteerServer(settings, jobs=RemoteJobs(jobs))
        self.server.start()
        self.core = self.server.core
        self.app = create_app(self.core)
        self.name = serve.get_replica_context().replica_id.unique_id
        self._channel: Any = None
        self.gauges = _replica_gauges()

    async def load(self, model_id: str) -> _Held:
        """Load ``model_id`` (wrapped by ``serve.multiplexed`` in :func:`build_app`, under this
        same name, which is how Ray Serve tells a multiplexed method from a function)."""
        spec = self.config.models[model_id]
        saes = [(sae_id, sae) for sae_id, sae in self.config.saes.items() if sae.model == model_id]

        def load() -> None:
            loaded = self.core.registry.load(spec.source, model_id, spec.dtype, spec.device)
            for sae_id, sae in saes:
                self.core.saes.load(loaded, sae.path, sae_id, hook=sae.hook)

        await asyncio.get_running_loop().run_in_executor(None, load)
        return _Held(self.core, model_id)

    async def http(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[Any]:
        """Run one HTTP request through steer's HTTP app: yields (status, headers) once, then
        the body's chunks as the app sends them."""
        from ray import serve

        await self.load(serve.get_multiplexed_model_id())
        async for item in run_asgi(self.app, method, path, query, headers, body, self.name):
            yield item

    async def grpc(
        self, method: str, request: bytes, metadata: tuple[tuple[str, str], ...], streaming: bool
    ) -> AsyncIterator[Any]:
        """Run one gRPC call on this replica's own server: yields its replies as bytes, or an
        error tuple (see :func:`steer.cluster.grpc_ingress.relay`)."""
        import grpc
        from ray import serve

        from steer.cluster.grpc_ingress import relay

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load(model_id)
        if self._channel is None:  # made on the loop that uses it
            limit = self.server.settings.max_message_bytes
            self._channel = grpc.aio.insecure_channel(
                self.server.target,
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                ],
            )
        async for reply in relay(self._channel, method, request, metadata, streaming):
            yield reply

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # Ray Serve's shutdown; the process ends anyway
            self.server.stop(grace=0.0)

    def check_health(self) -> None:
        """Ray Serve's health probe (every 10 s): a replica whose engine threads died is
        restarted. It also updates the replica's own gauges (Ray adds the replica's tags)."""
        for loaded in self.core.registry.all().values():
            if not loaded.worker._thread.is_alive():
                raise RuntimeError(f"the engine thread of {loaded.model_id} is not running")
            tags = {"model": loaded.model_id}
            self.gauges["running"].set(loaded.worker.running, tags=tags)
            self.gauges["waiting"].set(loaded.worker.waiting, tags=tags)


def _replica_gauges() -> dict[str, Any]:
    """steer's per-replica figures beside Ray Serve's own request counts and latencies, on the
    Prometheus endpoint of every node (``[cluster] metrics_port``)."""
    from ray.util.metrics import Gauge

    return {
        "running": Gauge(
            "steer_rows_running", "generation rows in the model's batch", tag_keys=("model",)
        ),
        "waiting": Gauge(
            "steer_requests_waiting", "requests queued for the model's batch", tag_keys=("model",)
        ),
    }


async def run_asgi(
    app: Any,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    replica: str,
) -> AsyncIterator[Any]:
    """Call an ASGI app with one request; yield (status, headers), then body chunks."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    delivered = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not delivered.is_set():
            delivered.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects from inside the replica
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                names = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
                yield message["status"], [*names, (REPLICA_HEADER, replica)]
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
    finally:
        task.cancel()


class RouterBody:
    """The ingress's logic: route by model id, stream the replica's answer back (HTTP here,
    gRPC in :class:`steer.cluster.grpc_ingress.GrpcIngress`, started with the router)."""

    async def __init__(self, replicas: Any, config: dict[str, Any]) -> None:  # type: ignore[misc]
        from steer.cluster.grpc_ingress import GrpcIngress

        self.replicas = replicas
        self.config = ClusterConfig.from_dict(config)
        self.grpc = GrpcIngress(replicas, self.config)
        await self.grpc.start()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        from steer.http import ollama
        from steer.http.answers import models_body
        from steer.http.tokens import CURRENT_MODEL

        body = await request.body()
        path = request.url.path
        if request.method == "GET" and path.rstrip("/") in ("/v1/models", "/v1/model/list"):
            # every model served, not one replica's
            return JSONResponse(models_body(self.config.models))
        if request.method == "GET" and path.rstrip("/") == ollama.TAGS:
            return JSONResponse(ollama.tags_body(self.config.models))
        if request.method == "GET" and path.rstrip("/") in CURRENT_MODEL:  # the app's default
            return JSONResponse(CURRENT_MODEL[path.rstrip("/")](self.config.default_model))
        if request.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"})
        model_id, problem = self._model_of(body)
        if problem is not None:
            return JSONResponse(problem, status_code=problem["error"]["code"])
        handle = self.replicas.options(multiplexed_model_id=model_id, stream=True)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        stream = handle.http.remote(request.method, path, request.url.query.encode(), headers, body)
        status, response_headers = await stream.__anext__()
        kept = {k: v for k, v in response_headers if k.lower() not in ("content-length",)}
        return StreamingResponse(_chunks(stream), status_code=status, headers=kept)

    def _model_of(self, body: bytes) -> tuple[str, dict[str, Any] | None]:
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = {}
        model_id = parsed.get("model") if isinstance(parsed, dict) else None
        model_id = model_id or self.config.default_model
        if model_id not in self.config.models:
            known = ", ".join(self.config.models)
            error = {
                "message": f"model {model_id!r} is not served here; models: {known}",
                "type": "not_found",
                "param": "model",
                "code": 404,
            }
            return model_id, {"error": error}
        return model_id, None


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield chunk


def build_app(config: ClusterConfig) -> Any:
    """The Ray Serve application for ``config`` (pass it to ``serve.run``)."""
    from ray import serve

    plain = config.to_dict()
    replica_class = type(
        "SteerReplica",
        (ReplicaBody,),
        {
            "load": serve.multiplexed(
                max_num_models_per_replica=config.replicas.max_models_per_replica
            )(ReplicaBody.load)
        },
    )
    replica = serve.deployment(name="SteerReplica")(replica_class)
    router = serve.deployment(name="SteerRouter")(type("SteerRouter", (RouterBody,), {}))
    jobs = serve.deployment(name="SteerJobs")(type("SteerJobs", (JobsBody,), {}))
    no_cpu: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    shared_jobs = jobs.options(**no_cpu).bind(plain)
    replicas = replica.options(**config.replicas.deployment_options()).bind(plain, shared_jobs)
    return router.options(**no_cpu).bind(replicas, plain)
