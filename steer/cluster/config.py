"""A Ray Serve deployment of steer, in one TOML file.

::

    [cluster]
    address = ""              # a running Ray cluster ("auto", "ray://host:10001"); "" = local
    num_cpus = 2              # local Ray only
    host = "127.0.0.1"        # the endpoints' host
    port = 8000               # HTTP ingress (the OpenAI-compatible API)
    grpc_port = 50051         # gRPC ingress (steer's gRPC API)
    metrics_port = 8080       # Prometheus metrics of every replica (local Ray only; unset: Ray's)

    [replicas]
    num_replicas = 2          # fixed; or min_replicas / max_replicas (autoscaling, with
    num_cpus = 1              #   target_ongoing_requests) passed through to Ray Serve
    num_gpus = 0
    max_models_per_replica = 1
    max_ongoing_requests = 64

    [server]                  # ServerSettings of every replica (steer serve's flags)
    models_root = "/mnt/steer"  # shared storage every node mounts: models, artifacts, sliders
    backend = "hf"
    max_batch = 16

    [models.smollm2]          # the model ids requests name, and what each loads
    source = "smollm2-135m-instruct"
    dtype = "float32"
    device = "cpu"

    [saes.res12]              # SAEs (under models_root), loaded with their model by every replica
    model = "smollm2"
    path = "saes/smollm2-res12"

    [jobs]                    # direction computes and bakes: each a Ray task with these resources
    num_cpus = 1
    num_gpus = 0
    max_running = 1
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError
from steer.service.settings import ServerSettings
from steer.toml_input import read_toml


@dataclass(frozen=True)
class ModelSpec:
    source: str
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class SaeSpec:
    model: str
    path: str
    #: hook point, when the SAE's own config does not say
    hook: str = ""


@dataclass(frozen=True)
class JobSpec:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: jobs running at once (more wait in the queue)
    max_running: int = 1


@dataclass(frozen=True)
class ReplicaSpec:
    #: fixed replica count (ignored when min_replicas or max_replicas asks for autoscaling)
    num_replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_models_per_replica: int = 1
    max_ongoing_requests: int = 64

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve ``.options()`` for the replica deployment."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 1,
                "max_replicas": self.max_replicas or max(1, self.min_replicas or 1),
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.num_replicas
        return options


@dataclass(frozen=True)
class ClusterFields:
    """The ``[cluster]`` table."""

    address: str = ""
    num_cpus: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    metrics_port: int | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterConfig(ClusterFields):
    models: dict[str, ModelSpec]
    replicas: ReplicaSpec = field(default_factory=ReplicaSpec)
    saes: dict[str, SaeSpec] = field(default_factory=dict)
    jobs: JobSpec = field(default_factory=JobSpec)
    #: ServerSettings fields for every replica (ports are the cluster's, not these)
    server: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise InvalidArgumentError("name at least one [models.ID] table", field="models")
        if self.grpc_port == self.port:
            raise InvalidArgumentError(
                f"must differ from cluster.port ({self.port})", field="cluster.grpc_port"
            )
        for sae_id, sae in self.saes.items():
            if sae.model not in self.models:
                raise InvalidArgumentError(
                    f"names model {sae.model!r}, which no [models.ID] table defines",
                    field=f"saes.{sae_id}.model",
                )
        self.server_settings()  # every server field checked now, not in a replica

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def server_settings(self) -> ServerSettings:
        """The settings of each replica's service core (no gRPC or HTTP port of its own)."""
        known = {item.name for item in fields(ServerSettings)}
        for name in self.server:
            if name not in known or name in ("host", "port", "http_port"):
                raise InvalidArgumentError(
                    f"unknown server setting {name!r}", field=f"server.{name}"
                )
        return ServerSettings(**{**self.server, "port": 0, "http_port": None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for sending to the replicas."""
        return {
            "cluster": {
                name: value
                for name, value in _plain(self, ClusterFields).items()
                if value is not None
            },
            "replicas": _plain(self.replicas),
            "saes": {sae_id: _plain(spec) for sae_id, spec in self.saes.items()},
            "jobs": _plain(self.jobs),
            "server": {
                key: str(value) if isinstance(value, Path) else value
                for key, value in self.server.items()
            },
            "models": {model_id: _plain(spec) for model_id, spec in self.models.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        cluster = _table(data, "cluster")
        replicas = _table(data, "replicas")
        models = _table(data, "models")
        saes = _table(data, "saes")
        for section in data:
            if section not in ("cluster", "replicas", "server", "models", "saes", "jobs"):
                raise InvalidArgumentError(f"unknown section [{section}]", field=section)
        return cls(
            models={
                model_id: _build(
                    ModelSpec, _table(models, model_id, "models."), f"models.{model_id}"
                )
                for model_id in models
            },
            replicas=_build(ReplicaSpec, replicas, "replicas"),
            saes={
                sae_id: _build(SaeSpec, _table(saes, sae_id, "saes."), f"saes.{sae_id}")
                for sae_id in saes
            },
            jobs=_build(JobSpec, _table(data, "jobs"), "jobs"),
            server=dict(_table(data, "server")),
            **_plain(_build(ClusterFields, cluster, "cluster")),
        )

    @classmethod
    def load(cls, path: Path) -> ClusterConfig:
        if not path.is_file():
            raise InvalidArgumentError(f"{path}: no such file", field="config")
        return cls.from_dict(read_toml(path, field="config"))


def _plain(spec: Any, kind: Any = None) -> dict[str, Any]:
    """``spec``'s fields (those of ``kind``, when given) as a dict."""
    return {item.name: getattr(spec, item.name) for item in fields(kind or spec)}


def _table(data: dict[str, Any], name: str, prefix: str = "") -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"[{prefix}{name}] must be a table", field=f"{prefix}{name}")
    return value


def _build(kind: Any, values: dict[str, Any], where: str) -> Any:
    """``kind(**values)``, each value checked against the type of its field's default (a number
    where a number is expected; counts >= 1) and named in the error."""
    known = {item.name: item for item in fields(kind)}
    for name, value in values.items():
        if name not in known:
            raise InvalidArgumentError(f"unknown setting {name!r}", field=f"{where}.{name}")
        _check_value(known[name].default, value, f"{where}.{name}")
    try:
        return kind(**values)
    except TypeError as error:  # a required field missing
        raise InvalidArgumentError(str(error), field=where) from None


def _check_value(default: Any, value: Any, where: str) -> None:
    if default is MISSING:  # the required fields are strings (a model's source)
        default = ""
    if value is None and default is None:
        return
    if isinstance(default, str) or (default is None and isinstance(value, str)):
        if not isinstance(value, str):
            raise InvalidArgumentError(f"must be a string, got {value!r}", field=where)
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int) and not isinstance(default, bool):
        if not number or value != int(value) or value < 1:
            raise InvalidArgumentError(f"must be an integer >= 1, got {value!r}", field=where)
    elif (isinstance(default, float) or default is None) and (not number or value < 0):
        raise InvalidArgumentError(f"must be a number >= 0, got {value!r}", field=where)
