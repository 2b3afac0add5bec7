"""Fuzz every rpc of the gRPC service and the HTTP API in process; counts per status code to
docs/reliability.md

    python scripts/fuzz_service.py [--count 1000] [--http 300] [--seed 1]
                                   [--model tiny|smollm2|all] [--services Generation,Bake]
                                   [--garbage 0.1] [--failures FILE] [--no-docs]
                                   [--backend hf|vllm] [--tensor-parallel-size N]

Serves the tiny random llama of tests/tiny.py (``--model smollm2``: SmolLM2-135M-Instruct from
its PyPI package; ``all``: one run on each) from a fresh models root and sends ``--count``
requests drawn by the strategies of tests/fuzzing.py with ``--seed``: well-formed requests with
one or two hostile fields, any message built from the proto descriptors, and (a ``--garbage``
fraction) raw bytes. Every request starts from the same root, models and SAEs and is checked for
the properties of issue #14: no INTERNAL/UNKNOWN, a healthy server, a normal stream sent with
each Generate request and feature read gets its tokens alone, no file outside the request's own
output touched, no absolute server path in errors. Bakes use a tiny source model, so they take a
fraction of a second whatever model is served.

Then ``--http`` requests (0: none) go to the OpenAI-compatible HTTP API of the same server
(tests/fuzzing.py's HttpFuzzer): generation bodies built from every field steer.http.fields
knows with hostile values, bodies that are no JSON object, every route and method, each
generation body beside a normal stream over HTTP. Properties: never a 5xx, every error in
OpenAI's shape (in a stream: an error chunk, then ``data: [DONE]``), strict JSON, no traceback
or absolute path, a healthy server, the normal stream's text alone.

Prints one JSON line per model (counts per status code, innocent streams and how many were
harmed, INTERNAL/UNKNOWN answers, distinct failures), writes the distinct failures as JSON lines
to ``--failures`` (rpc, request, status, details, server log, broken properties) and replaces the
section "fuzz-<model>" of docs/reliability.md: a table of status codes per rpc and the failures
(not for a ``--services`` subset), and "fuzz-http-<model>": HTTP statuses per route.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import (
    RPCS,
    FuzzResult,
    HttpFuzzer,
    Outcome,
    describe_case,
    fuzz_server,
    rpcs_of,
    run_fuzz,
    run_http_fuzz,
    status_table,
)
from report import emit, machine, table, write_section
from tiny import VLLM_SIZES, tiny_handle

from steer.models import ModelHandle, load_model

SMOLLM2 = "smollm2-135m-instruct"


def serve(model: str, backend: str = "hf", workers: int = 1) -> tuple[ModelHandle, dict[str, Any]]:
    """The handle to serve and the fuzz_server options for ``model`` on ``backend`` (vllm:
    over ``workers`` tensor-parallel workers)."""
    # vLLM's CPU attention has no kernel for the tiny configs' 16-wide heads
    tiny = tiny_handle("llama", **(VLLM_SIZES if backend == "vllm" else {}))
    engine: dict[str, Any] = {}
    if backend == "vllm":
        engine = {"backend": backend, "kv_cache_gib": 1, "tensor_parallel_size": workers}
    if model == "tiny":
        return tiny, {"model_id": "tiny", **engine}
    handle = load_model(SMOLLM2)
    options = {"model_id": "smollm2", "model_source": SMOLLM2, "bake_source": tiny}
    return handle, {**options, **engine}


def failure_record(key: str, case: Any, outcome: Outcome, count: int) -> dict[str, Any]:
    return {
        "key": key,
        "count": count,
        "rpc": outcome.label,
        "status": outcome.code,
        "field": outcome.error_field,
        "details": outcome.details[:2000],
        "job": outcome.job,
        "innocent": outcome.innocent,
        "server_log": outcome.causes[:4],
        "violations": outcome.violations,
        "request": describe_case(case, limit=4000),
    }


def _failures_table(result: FuzzResult, what: str) -> list[str]:
    """The distinct failures of ``result``, the smallest request of each, as markdown lines."""
    if not result.failures:
        return []
    failures = []
    for _key, (case, outcome, count) in sorted(result.failures.items()):
        cause = next((c.split(" | ", 1)[1] for c in outcome.causes if " | " in c), "")
        failures.append(
            {
                what: outcome.label,
                "status": outcome.code + (f" (job {outcome.job})" if outcome.job else ""),
                "times": count,
                "broke": "; ".join(v[:160] for v in outcome.violations[:3]),
                "server log": cause[:200],
                "request": describe_case(case, limit=240),
            }
        )
    columns = [what, "status", "times", "broke", "server log", "request"]
    for row in failures:
        for column in ("broke", "server log", "request"):
            row[column] = str(row[column]).replace("|", "\\|").replace("\n", " ")
    return ["", "Distinct failures (the smallest request of each):", "", table(failures, columns)]


def _backend(args: argparse.Namespace) -> str:
    flags = "" if args.backend == "hf" else f" --backend {args.backend}"
    if args.tensor_parallel_size > 1:
        flags += f" --tensor-parallel-size {args.tensor_parallel_size}"
    return flags


def markdown(model: str, result: FuzzResult, args: argparse.Namespace, seconds: float) -> str:
    rows, columns = status_table(result)
    jobs = ", ".join(f"{state} {n}" for state, n in sorted(result.jobs.items())) or "none"
    lines = [
        f"`python scripts/fuzz_service.py --model {model}{_backend(args)} --count {args.count} "
        f"--seed {args.seed} --garbage {args.garbage}`: {len(result.outcomes)} requests in "
        f"{seconds:.0f} s on {machine()}.",
        "",
        f"INTERNAL/UNKNOWN: **{result.internal}**; normal streams sent beside a request: "
        f"{result.innocent_streams}, harmed: **{result.innocent_harmed}**; requests that broke "
        f"a property: **{result.violating}** ({len(result.failures)} distinct). Jobs started: "
        f"{jobs}.",
        "",
        table(rows, columns),
    ]
    return "\n".join(lines + _failures_table(result, "rpc"))


def http_markdown(model: str, result: FuzzResult, args: argparse.Namespace, seconds: float) -> str:
    rows, columns = status_table(result)
    for row in rows:
        row["route"] = row.pop("rpc")
    columns = ["route", *columns[1:]]
    lines = [
        f"`python scripts/fuzz_service.py --model {model}{_backend(args)} --http {args.http} "
        f"--seed {args.seed}`: {len(result.outcomes)} HTTP requests in {seconds:.0f} s on "
        f"{machine()}.",
        "",
        f"5xx: **{result.internal}**; normal streams (over HTTP) sent beside a generation "
        f"body: {result.innocent_streams}, harmed: **{result.innocent_harmed}**; requests that "
        f"broke a property: **{result.violating}** ({len(result.failures)} distinct). "
        '"200 error chunk": a stream that ended with an error chunk and `data: [DONE]`.',
        "",
        table(rows, columns),
    ]
    return "\n".join(lines + _failures_table(result, "route"))


def _write_failures(args: argparse.Namespace, model: str, suffix: str, result: FuzzResult) -> None:
    if not args.failures:
        return
    path = Path(f"{args.failures}.{model}" if args.model == "all" else args.failures)
    with path.open("a" if suffix else "w") as out:
        for key, (case, outcome, count) in sorted(result.failures.items()):
            record = failure_record(key, case, outcome, count)
            out.write(json.dumps({**record, "front_end": suffix or "grpc"}) + "\n")


def _summary(result: FuzzResult, seconds: float) -> dict[str, Any]:
    return {
        "requests": len(result.outcomes),
        "statuses": dict(result.statuses.most_common()),
        "innocent_streams": result.innocent_streams,
        "innocent_harmed": result.innocent_harmed,
        "internal": result.internal,
        "violating": result.violating,
        "distinct_failures": len(result.failures),
        "seconds": round(seconds, 1),
    }


def fuzz(model: str, args: argparse.Namespace) -> dict[str, Any]:
    served, options = serve(model, args.backend, args.tensor_parallel_size)
    name = model if args.backend == "hf" else f"{model}-{args.backend}"
    if args.tensor_parallel_size > 1:
        name += f"-tp{args.tensor_parallel_size}"
    if args.http > 0:
        options["http_port"] = 0
    record: dict[str, Any] = {"model": model, "backend": args.backend, "seed": args.seed}
    with (
        tempfile.TemporaryDirectory(prefix="steer-fuzz-") as directory,
        fuzz_server(served, Path(directory) / "models", **options) as fuzzer,
    ):

        def progress_of(bar: tqdm) -> Any:
            def progress(index: int, case: Any, outcome: Outcome) -> None:
                bar.update(1)
                if outcome.violations:
                    bar.set_postfix(failing=index)

            return progress

        if args.count > 0:
            started = time.monotonic()
            rpcs = rpcs_of(*args.services.split(",")) if args.services else RPCS
            with tqdm(total=args.count, desc=f"fuzz {model}", file=sys.stderr) as bar:
                result = run_fuzz(
                    fuzzer,
                    args.count,
                    args.seed,
                    rpcs=rpcs,
                    garbage=args.garbage,
                    progress=progress_of(bar),
                )
            seconds = time.monotonic() - started
            _write_failures(args, model, "", result)
            if not args.no_docs and not args.services:
                write_section(
                    "reliability.md",
                    f"fuzz-{name}",
                    markdown(model, result, args, seconds),
                    "Reliability",
                )
            record.update(_summary(result, seconds), jobs=dict(result.jobs))
        if args.http > 0:
            started = time.monotonic()
            http = HttpFuzzer(fuzzer)
            try:
                http.start()
                with tqdm(total=args.http, desc=f"fuzz http {model}", file=sys.stderr) as bar:
                    result = run_http_fuzz(http, args.http, args.seed, progress=progress_of(bar))
            finally:
                http.close()
            seconds = time.monotonic() - started
            _write_failures(args, model, "http", result)
            if not args.no_docs:
                write_section(
                    "reliability.md",
                    f"fuzz-http-{name}",
                    http_markdown(model, result, args, seconds),
                    "Reliability",
                )
            record["http"] = _summary(result, seconds)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="gRPC requests per model")
    parser.add_argument("--http", type=int, default=300, help="HTTP requests per model (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", choices=("tiny", "smollm2", "all"), default="tiny")
    parser.add_argument("--services", help="only these services (Generation,Bake,...)")
    parser.add_argument("--garbage", type=float, default=0.1, help="fraction of raw bytes")
    parser.add_argument("--failures", help="write the distinct failures here (JSON lines)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.md")
    parser.add_argument(
        "--backend", choices=("hf", "vllm"), default="hf", help="the server's engine (default hf)"
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vllm: tensor-parallel workers"
    )
    args = parser.parse_args()
    models = ("tiny", "smollm2") if args.model == "all" else (args.model,)
    clean = True
    for model in models:
        record = fuzz(model, args)
        emit(record)
        clean = clean and record.get("violating", 0) == 0
        clean = clean and record.get("http", {}).get("violating", 0) == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
