"""A bounded soak of the gRPC service on loopback: errors and server RSS over time.

    python scripts/load_test.py [--count 400] [--duration 300] [--concurrency 16]
                                [--bad-fraction 0.1] [--model smollm2-135m-instruct]
                                [--server HOST:PORT --server-pid PID] [--no-docs]

Starts ``steer serve`` in a subprocess (unless ``--server`` names a running one), then keeps
``--concurrency`` client threads busy until ``--count`` requests were made or ``--duration``
seconds passed. Each request has its own slider and seed; a ``--bad-fraction`` of them are
malformed on purpose (expected INVALID_ARGUMENT / NOT_FOUND) and some are cancelled mid-stream.
Samples the server's RSS every second. Prints one JSON line (errors by status code, unexpected
errors, RSS start/peak/end, tokens/s) and writes docs/benchmarks.md section "service-soak".
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine, table, write_section

from steer.client import RemoteError, SteerClient, add, generate_request

HOOK = "blocks.8.hook_resid_post"
PROMPTS = ["Tell me a joke.", "What is a rainbow?", "Write two lines about autumn.", "Hi!"]


def start_server(model: str) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "steer",
        "serve",
        "--port",
        "0",
        "--http-port",
        "-1",
        "--model",
        model,
    ]
    process = subprocess.Popen(
        [*command, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("serving "):
            return process, line.split(" on ")[1].split()[0]
    raise RuntimeError(f"steer serve exited with {process.wait()}")


def bad_request(rng: random.Random, d_model: int) -> tuple[Any, str]:
    """A malformed request and the status it must get."""
    choice = rng.randrange(4)
    if choice == 0:
        return generate_request("Hi", temperature=-1.0), "INVALID_ARGUMENT"
    if choice == 1:
        steer = add([1.0] * (d_model + 1), 1.0, hooks=[HOOK])
        return generate_request("Hi", interventions=[steer]), "INVALID_ARGUMENT"
    if choice == 2:
        return generate_request("Hi", model="absent"), "NOT_FOUND"
    steer = add([float("nan")] * d_model, 1.0, hooks=[HOOK])
    return generate_request("Hi", interventions=[steer]), "INVALID_ARGUMENT"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--server", help="HOST:PORT of a running server (else one is started)")
    parser.add_argument("--server-pid", type=int, help="its process id, for RSS sampling")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    process = None
    if args.server:
        target, pid = args.server, args.server_pid
    else:
        process, target = start_server(args.model)
        pid = process.pid
    server_process = psutil.Process(pid) if pid else None
    rss: list[tuple[float, float]] = []
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    tokens = 0
    issued = 0
    lock = threading.Lock()
    started = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if server_process is not None:
                rss.append(
                    (time.perf_counter() - started, server_process.memory_info().rss / 2**20)
                )
            done.wait(1.0)

    def worker(seed: int) -> None:
        nonlocal tokens, issued
        rng = random.Random(seed)
        with SteerClient(target, timeout=600) as client:
            d_model = client.model_info().d_model
            while True:
                with lock:
                    if issued >= args.count or time.perf_counter() - started > args.duration:
                        return
                    issued += 1
                    number = issued
                expected = "OK"
                if rng.random() < args.bad_fraction:
                    request, expected = bad_request(rng, d_model)
                else:
                    vector = [rng.gauss(0, 1) for _ in range(d_model)]
                    request = generate_request(
                        PROMPTS[number % len(PROMPTS)],
                        interventions=[add(vector, rng.uniform(0, 4), hooks=[HOOK])],
                        seed=number,
                        temperature=0.8,
                        max_new_tokens=args.max_new_tokens,
                    )
                cancel = expected == "OK" and rng.random() < args.cancel_fraction
                got, count = "OK", 0
                try:
                    stream = client.stream(request)
                    for event in stream:
                        count += len(event.token_ids)
                        if cancel and count >= 2:
                            stream.close()
                            got = "CANCELLED_BY_CLIENT"
                            break
                except RemoteError as error:
                    got = error.code.name
                with lock:
                    tokens += count
                    outcomes[got] += 1
                    if got != expected and not (cancel and got == "CANCELLED_BY_CLIENT"):
                        unexpected.append(f"request {number}: expected {expected}, got {got}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    wall = time.perf_counter() - started
    if process is not None:
        process.terminate()
        process.wait(timeout=60)
    values = [value for _, value in rss]
    record = {
        "benchmark": "service-soak",
        "model": args.model,
        "requests": issued,
        "concurrency": args.concurrency,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "outcomes": dict(outcomes),
        "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:5],
        "rss_mb_start": values[0] if values else None,
        "rss_mb_peak": max(values) if values else None,
        "rss_mb_end": values[-1] if values else None,
        "rss_mb_over_time": [(round(t), round(v)) for t, v in rss[:: max(1, len(rss) // 20)]],
        "machine": machine(),
    }
    emit(record)
    if not args.no_docs:
        row = {k: record[k] for k in ("requests", "concurrency", "wall_s", "tokens_per_s")}
        row.update(
            {
                "ok": outcomes.get("OK", 0),
                "rejected_as_expected": sum(
                    v for k, v in outcomes.items() if k not in ("OK", "CANCELLED_BY_CLIENT")
                ),
                "cancelled": outcomes.get("CANCELLED_BY_CLIENT", 0),
                "unexpected": len(unexpected),
                "rss_mb_start": record["rss_mb_start"],
                "rss_mb_peak": record["rss_mb_peak"],
                "rss_mb_end": record["rss_mb_end"],
            }
        )
        markdown = (
            "## Service soak\n\n"
            f"`python scripts/load_test.py --count {args.count} --concurrency {args.concurrency}` "
            f"on {machine()}; {args.model}, {args.max_new_tokens} new tokens, "
            f"{args.bad_fraction:.0%} malformed requests, {args.cancel_fraction:.0%} cancelled "
            "by the client after two tokens. RSS is the server process's.\n\n"
            + table([row], list(row))
        )
        write_section("benchmarks.md", "service-soak", markdown, title="Benchmarks")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
