"""Scale-out on Ray Serve (``steer deploy CONFIG``; ``pip install -e ".[ray]"``).

:mod:`~steer.cluster.config` reads the deployment's TOML file, :mod:`~steer.cluster.app` builds
the Ray Serve application (HTTP and gRPC endpoints in front of replicas of the service core,
:mod:`~steer.cluster.grpc_ingress`), :mod:`~steer.cluster.jobs` runs jobs as Ray tasks.
Importing this package does not import Ray.
"""

from steer.cluster.config import ClusterConfig, JobSpec, ModelSpec, ReplicaSpec, SaeSpec

__all__ = ["ClusterConfig", "JobSpec", "ModelSpec", "ReplicaSpec", "SaeSpec"]
