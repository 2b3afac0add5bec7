"""``steer serve``: run the service (with no flags: SmolLM2, gRPC on 127.0.0.1:50051 and the
OpenAI-compatible HTTP API on 127.0.0.1:8000)."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from steer.backends import BACKENDS
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        help=f"offline name or model path to load (repeatable; default {DEFAULT_MODEL}); "
        "'none' starts without a model",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 = any)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="port of the OpenAI-compatible HTTP API (default 8000; 0 = any; -1 = off)",
    )
    parser.add_argument(
        "--sliders", type=Path, help="TOML file of named sliders (docs/service.md#sliders)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--max-batch", type=int, default=16, help="rows per running batch")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests per model")
    parser.add_argument("--max-new-tokens-cap", type=int, default=2048, help="per-request limit")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192, help="per-request limit")
    parser.add_argument("--token-file", type=Path, help="require 'authorization: Bearer <token>'")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    parser.add_argument(
        "--models-root",
        type=Path,
        default=Path("models"),
        help="directory for remote Load paths, artifacts and bake outputs (default ./models)",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds for streams")
    parser.add_argument("--log-level", default="INFO")
    add_backend_arguments(parser)
    return parser


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend and the vllm backend's options (steer serve and steer demo)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="hf",
        help="generation engine: hf (transformers, the reference; default) or vllm "
        '(pip install -e ".[vllm]")',
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model (default 1)"
    )
    parser.add_argument(
        "--kv-cache-gib", type=int, default=2, help="vllm on CPU: KV cache in GiB (default 2)"
    )


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {path}: {error}", field="token_file") from None
    if not token:
        raise InvalidArgumentError(f"{path} is empty", field="token_file")
    return token


def check_port(host: str, port: int, option: str) -> None:
    """Refuse a port some other process listens on, before any model is loaded: bind it for a
    moment (with SO_REUSEADDR, as the servers do, so a recently closed port still counts as
    free). Port 0 picks a free port and always works."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise InvalidArgumentError(f"cannot resolve {host!r}: {error}", field="--host") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise FailedPreconditionError(
                    _port_message(host, port, option, error), field=option
                ) from None


def _port_message(host: str, port: int, option: str, error: OSError) -> str:
    if error.errno != errno.EADDRINUSE:
        return f"cannot listen on {host}:{port} ({error.strerror}); choose another with {option} N"
    other = " (or --http-port -1 to turn the HTTP API off)" if option == "--http-port" else ""
    return (
        f"port {port} on {host} is in use (another steer serve?); choose a free one with "
        f"{option} N{other}"
    )


def check_before_loading(args: argparse.Namespace, names: list[str]) -> None:
    """What would otherwise fail after minutes of loading: ports (first: nothing heavy is
    imported for them), dtype, model names."""
    if args.http_port >= 0 and args.http_port == args.port != 0:
        raise InvalidArgumentError(
            f"--port and --http-port are both {args.port}; give them different ports",
            field="--http-port",
        )
    check_port(args.host, args.port, "--port")
    if args.http_port > 0:
        check_port(args.host, args.http_port, "--http-port")
    from steer.models import DTYPES
    from steer.offline import OFFLINE_MODELS

    if args.dtype not in DTYPES:
        raise InvalidArgumentError(f"use one of {', '.join(DTYPES)}", field="--dtype")
    for name in names:
        if name not in OFFLINE_MODELS and not Path(name).exists():
            raise NotFoundError(
                f"{name!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor an "
                "existing path",
                field="--model",
            )


def _settings(args: argparse.Namespace) -> Any:
    from steer.server import ServerSettings

    return ServerSettings(
        host=args.host,
        port=args.port,
        models_root=args.models_root,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        max_new_tokens_cap=args.max_new_tokens_cap,
        default_max_new_tokens=min(128, args.max_new_tokens_cap),
        max_prompt_tokens=args.max_prompt_tokens,
        token=read_token(args.token_file) if args.token_file else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        shutdown_grace=args.shutdown_grace,
        sliders=args.sliders,
        http_port=None if args.http_port < 0 else args.http_port,
        backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_gib=args.kv_cache_gib,
    )


def _load(server: Any, names: list[str], args: argparse.Namespace) -> None:
    from steer.models import load_model

    for name in names:
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        handle = load_model(name, dtype=args.dtype, device=args.device)
        model_id = Path(name).name.removesuffix(".gguf")
        server.registry.add(model_id, handle, name)
        print(f"loaded {model_id} in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def _start(server: Any, args: argparse.Namespace) -> int:
    """Start serving; a port taken while the models loaded is said as plainly as before."""
    try:
        return int(server.start())
    except OSError as error:
        for port, option in ((args.port, "--port"), (args.http_port, "--http-port")):
            check_port(args.host, port if port > 0 else 0, option)
        raise FailedPreconditionError(
            f"could not start serving on {args.host}: {error}", field="--port"
        ) from None


def main(argv: list[str], *, prog: str = "steer serve", command: str = "serve") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    names = [m for m in (args.model or [DEFAULT_MODEL]) if m != "none"]
    check_before_loading(args, names)
    from steer.server import SteerServer

    server = SteerServer(_settings(args))  # reads the sliders file: its mistakes show here too
    _load(server, names, args)
    port = _start(server, args)
    target = f"{args.host}:{port}"
    scheme = "TLS" if args.tls_cert else "plaintext"
    print(
        f"serving {', '.join(server.registry.all()) or 'no model'} on {target} ({scheme}); "
        "ctrl-c to stop",
        flush=True,
    )
    print(f'try:  steer generate --server {target} "Write a haiku about the sea"', flush=True)
    if server.http_port is not None:
        print(
            f"OpenAI-compatible API: {server.http_url}/v1 (SillyTavern: docs/service.md)",
            flush=True,
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("shutting down ...", file=sys.stderr, flush=True)
    server.stop()
    return 0
