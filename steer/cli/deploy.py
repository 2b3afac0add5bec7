"""``steer deploy CONFIG``: serve steer as a Ray Serve application (docs/scaling.md).

Starts (or joins, with ``[cluster] address``) a Ray cluster, runs the application that
``CONFIG`` describes (replicas of the service core behind one OpenAI-compatible HTTP endpoint
and one gRPC endpoint, models routed to the replicas that hold them) and serves until
interrupted, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from steer.errors import FailedPreconditionError


def start(config: Any, temp_dir: str | None = None) -> str:
    """Start Ray (unless already running) and the application; returns the endpoint's URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise FailedPreconditionError(
            f'steer deploy needs Ray Serve (pip install -e ".[ray]"): {error}', field="ray"
        ) from None
    from steer.cluster.app import build_app

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False}
        if config.address:
            options["address"] = config.address
        else:
            if config.num_cpus is not None:
                options["num_cpus"] = config.num_cpus
            if config.metrics_port is not None:
                options["_metrics_export_port"] = config.metrics_port
        if temp_dir is not None:
            options["_temp_dir"] = temp_dir
        ray.init(**options)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name="steer", route_prefix="/")
    return f"http://{config.host}:{config.port}/v1"


def stop() -> None:
    """Shut Serve and Ray down (nothing to do if Ray is not running)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str], *, prog: str = "steer deploy", command: str = "deploy") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the deployment's TOML file")
    args = parser.parse_args(argv)
    from steer.cluster import ClusterConfig

    config = ClusterConfig.load(args.config)
    print(f"starting {len(config.models)} model(s) on Ray Serve ...", file=sys.stderr, flush=True)
    url = start(config)
    print(f"serving the OpenAI-compatible API on {url}", file=sys.stderr, flush=True)
    target = f"{config.host}:{config.grpc_port}"
    print(f"serving steer's gRPC API on {target}", file=sys.stderr, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            time.sleep(0)
    finally:
        stop()
    return 0
