"""Scale-out on Ray Serve (``steer deploy CONFIG``; ``pip install -e ".[ray]"``).

:mod:`~steer.cluster.config` reads the deployment's TOML file, :mod:`~steer.cluster.app` builds
the Ray Serve application (an HTTP router in front of replicas of the service core). Importing
this package does not import Ray.
"""

from steer.cluster.config import ClusterConfig, ModelSpec, ReplicaSpec

__all__ = ["ClusterConfig", "ModelSpec", "ReplicaSpec"]
