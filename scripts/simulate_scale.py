"""Predicts how steer scales over N replicas with a queueing model fed measured per-replica rates

A discrete-event simulation, not a measurement: each replica is one steer engine whose aggregate
decode tokens/s, as a function of the streams running on it, is read from docs/benchmarks.md
(piecewise-linear between measured batch sizes, capped at ``--max-batch`` rows). Requests arrive
as a Poisson process, are routed by power-of-two-choices on ongoing requests (Ray Serve's
default), wait in the replica's queue, are prefilled together when rows free up (decoding pauses
meanwhile, as in steer's hf engine) and then decode with the rest of the batch. For each replica
count the highest arrival rate whose p95 time-to-first-token stays under ``--ttft-target`` is
found by bisection, and the figures at that rate are written to docs/scaling.md ("simulation").

    python scripts/simulate_scale.py                   # hf and vllm curves, N = 1 .. 64
    python scripts/simulate_scale.py --backend hf --replicas 1,2,4 --no-docs
"""

from __future__ import annotations

import argparse
import heapq
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DOCS, emit, table, write_section

# Used only when docs/benchmarks.md has no row for the backend (see Curve.source).
DEFAULT_CURVES = {"hf": "1:17.09,4:40.16,16:118.1", "vllm": "1:27,16:300"}


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Aggregate decode tokens/s of one replica as a function of its running streams."""

    streams: tuple[int, ...]
    tokens_per_s: tuple[float, ...]
    source: str

    def rate(self, running: int) -> float:
        """Piecewise linear through (0, 0) and the measured points; flat past the last one."""
        return float(np.interp(running, (0, *self.streams), (0.0, *self.tokens_per_s)))

    def describe(self) -> str:
        points = ", ".join(
            f"{s}: {r:g}" for s, r in zip(self.streams, self.tokens_per_s, strict=True)
        )
        return f"{points} (streams: tok/s)"


@dataclass(frozen=True)
class Workload:
    """The request mix and the per-replica assumptions of one simulation."""

    prompt_tokens: tuple[int, int]
    reply_tokens: tuple[int, int]
    configs: int
    config_slowdown: float
    slowdown_floor: float
    prefill_rate: float
    max_batch: int
    ttft_target: float
    requests_per_replica: int
    min_requests: int
    warmup_fraction: float


@dataclass(frozen=True)
class Requests:
    """Pre-drawn requests for one replica count: unit-rate arrival gaps scaled per arrival rate,
    so that every rate of a bisection sees the same requests (common random numbers)."""

    unit_gaps: np.ndarray
    prompt_tokens: np.ndarray
    reply_tokens: np.ndarray
    config: np.ndarray
    route_choices: np.ndarray  # (count, 2) replica indices


def markdown_tables(path: Path) -> dict[str, list[dict[str, str]]]:
    """Every section of a generated docs file with its first table, as rows of cells."""
    text = path.read_text() if path.exists() else ""
    sections = {}
    for name, body in re.findall(r"<!-- BEGIN (\S+) -->(.*?)<!-- END \1 -->", text, re.S):
        lines = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
        if len(lines) < 3:
            continue
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
        sections[name] = [dict(zip(header, row, strict=True)) for row in rows]
    return sections


def measured_curve(backend: str, benchmarks: Path) -> Curve | None:
    """hf: the served path (bench_service.py's gRPC tokens/s, one slider per stream); vllm: the
    engine's steered tokens/s from bench_engine.py --backend hf,vllm."""
    sections = markdown_tables(benchmarks)
    if backend == "hf" and sections.get("service"):
        rows = sections["service"]
        points = {int(row["streams"]): float(row["grpc_tokens_per_s"]) for row in rows}
        source = "docs/benchmarks.md, section service (bench_service.py, gRPC tokens/s)"
    else:
        rows = [
            row
            for row in sections.get("engine-cpu-hf-vllm", [])
            if row.get("backend", "hf") == backend and "steered tok/s" in row
        ]
        points = {int(row["batch"]): float(row["steered tok/s"]) for row in rows}
        source = "docs/benchmarks.md, section engine-cpu-hf-vllm (bench_engine.py, steered tok/s)"
    if not points:
        return None
    streams = tuple(sorted(points))
    return Curve(streams, tuple(points[s] for s in streams), source)


def parse_curve(text: str, source: str) -> Curve:
    pairs = sorted((int(s), float(r)) for s, r in (item.split(":") for item in text.split(",")))
    return Curve(tuple(s for s, _ in pairs), tuple(r for _, r in pairs), source)


def resolve_curve(backend: str, override: str | None, benchmarks: Path) -> Curve:
    if override:
        return parse_curve(override, f"--{backend}-curve on the command line")
    curve = measured_curve(backend, benchmarks)
    if curve is not None:
        return curve
    return parse_curve(
        DEFAULT_CURVES[backend],
        "this script's built-in default, not a row of docs/benchmarks.md (none for this backend "
        "when it ran): figures reported by the developer for bench_engine.py --backend hf,vllm",
    )


def draw_requests(count: int, replicas: int, workload: Workload, seed: int) -> Requests:
    rng = np.random.default_rng(seed)
    low, high = workload.prompt_tokens
    reply_low, reply_high = workload.reply_tokens
    return Requests(
        unit_gaps=rng.exponential(1.0, count),
        prompt_tokens=rng.integers(low, high + 1, count),
        reply_tokens=rng.integers(reply_low, reply_high + 1, count),
        config=rng.integers(0, workload.configs, count),
        route_choices=two_replicas(rng, replicas, count),
    )


def two_replicas(rng: np.random.Generator, replicas: int, count: int) -> np.ndarray:
    """Two different replicas per request (the same one twice only when there is one)."""
    first = rng.integers(0, replicas, count)
    offset = rng.integers(1, replicas, count) if replicas > 1 else np.zeros(count, dtype=int)
    return np.stack([first, (first + offset) % replicas], axis=1)


# -- the simulation ----------------------------------------------------------------------------


@dataclass
class Replica:
    """One engine. Decoding streams all advance at the same per-stream rate, so one "virtual"
    counter of tokens per stream stands for all of them; a stream ends when it reaches its
    target."""

    queue: deque[int] = field(default_factory=deque)
    decoding: list[tuple[float, int]] = field(default_factory=list)  # heap of (target, request)
    configs: Counter[int] = field(default_factory=Counter)
    virtual_tokens: float = 0.0
    clock: float = 0.0
    prefilling: list[int] = field(default_factory=list)
    prefill_end: float = 0.0
    version: int = 0

    @property
    def ongoing(self) -> int:
        return len(self.queue) + len(self.decoding) + len(self.prefilling)


class Simulation:
    def __init__(self, curve: Curve, workload: Workload, requests: Requests, replicas: int):
        self.curve, self.workload, self.requests = curve, workload, requests
        self.replicas = [Replica() for _ in range(replicas)]
        count = len(requests.unit_gaps)
        self.first_token = np.full(count, np.nan)
        self.finish = np.full(count, np.nan)
        self.events: list[tuple[float, int, int]] = []  # (time, replica, version)
        self.rates = [curve.rate(b) for b in range(workload.max_batch + 1)]

    def stream_rate(self, replica: Replica) -> float:
        running = len(replica.decoding)
        if replica.prefilling or running == 0:
            return 0.0
        workload = self.workload
        slowdown = max(
            workload.slowdown_floor, workload.config_slowdown ** (len(replica.configs) - 1)
        )
        return self.rates[min(running, workload.max_batch)] * slowdown / running

    def advance(self, replica: Replica, now: float) -> None:
        replica.virtual_tokens += (now - replica.clock) * self.stream_rate(replica)
        replica.clock = now

    def settle(self, index: int, now: float) -> None:
        """Bring replica ``index`` to ``now``: finish its prefill and streams due by then, admit
        from its queue, and schedule its next event."""
        replica = self.replicas[index]
        self.advance(replica, now)
        if replica.prefilling and replica.prefill_end <= now + 1e-9:
            for request in replica.prefilling:
                self.first_token[request] = now
                target = replica.virtual_tokens + self.requests.reply_tokens[request] - 1
                heapq.heappush(replica.decoding, (target, request))
                replica.configs[self.requests.config[request]] += 1
            replica.prefilling = []
        while replica.decoding and replica.decoding[0][0] <= replica.virtual_tokens + 1e-6:
            _, request = heapq.heappop(replica.decoding)
            self.finish[request] = now
            config = self.requests.config[request]
            replica.configs[config] -= 1
            if not replica.configs[config]:
                del replica.configs[config]
        self.admit(replica, now)
        replica.version += 1
        self.schedule(index, replica)

    def admit(self, replica: Replica, now: float) -> None:
        """Like steer's engine: every waiting request that fits is prefilled in one pass."""
        if replica.prefilling:
            return
        free = self.workload.max_batch - len(replica.decoding)
        while replica.queue and free > 0:
            replica.prefilling.append(replica.queue.popleft())
            free -= 1
        if replica.prefilling:
            prompt = sum(int(self.requests.prompt_tokens[r]) for r in replica.prefilling)
            replica.prefill_end = now + prompt / self.workload.prefill_rate

    def schedule(self, index: int, replica: Replica) -> None:
        if replica.prefilling:
            when = replica.prefill_end
        elif replica.decoding:
            remaining = replica.decoding[0][0] - replica.virtual_tokens
            when = replica.clock + max(remaining, 0.0) / self.stream_rate(replica)
        else:
            return
        heapq.heappush(self.events, (when, index, replica.version))

    def route(self, request: int) -> int:
        first, second = self.requests.route_choices[request]
        replicas = self.replicas
        return int(first if replicas[first].ongoing <= replicas[second].ongoing else second)

    def run(self, arrival_rate: float) -> np.ndarray:
        arrivals = np.cumsum(self.requests.unit_gaps) / arrival_rate
        for request, arrival in enumerate(arrivals):
            self.drain(arrival)
            index = self.route(request)
            self.replicas[index].queue.append(request)
            self.settle(index, arrival)
        self.drain(float("inf"))
        return arrivals

    def drain(self, until: float) -> None:
        """Process every scheduled event before ``until``, skipping superseded ones."""
        events = self.events
        while events and events[0][0] <= until:
            when, index, version = heapq.heappop(events)
            if version == self.replicas[index].version:
                self.settle(index, when)


@dataclass(frozen=True)
class Outcome:
    arrival_rate: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    inter_token_p50_ms: float


def simulate(
    curve: Curve, workload: Workload, requests: Requests, replicas: int, arrival_rate: float
) -> Outcome:
    simulation = Simulation(curve, workload, requests, replicas)
    arrivals = simulation.run(arrival_rate)
    count = len(arrivals)
    measured = slice(int(count * workload.warmup_fraction), count)
    ttft = simulation.first_token[measured] - arrivals[measured]
    decode_tokens = requests.reply_tokens[measured] - 1
    inter_token = (simulation.finish[measured] - simulation.first_token[measured]) / decode_tokens
    # Throughput over the window in which measured requests arrive: tokens of the requests that
    # finished inside it (all requests finish by the end of the run).
    start, end = arrivals[measured][0], arrivals[-1]
    done = (simulation.finish >= start) & (simulation.finish <= end)
    window = end - start
    return Outcome(
        arrival_rate=arrival_rate,
        requests_per_s=float(done.sum() / window),
        tokens_per_s=float(requests.reply_tokens[done].sum() / window),
        ttft_p50=float(np.percentile(ttft, 50)),
        ttft_p95=float(np.percentile(ttft, 95)),
        inter_token_p50_ms=float(np.percentile(inter_token, 50) * 1000),
    )


def capacity(
    curve: Curve, workload: Workload, replicas: int, seed: int, steps: int
) -> Outcome | None:
    """The highest arrival rate (to 1/2**steps of the upper bound) with p95 TTFT under target."""
    count = max(workload.requests_per_replica * replicas, workload.min_requests)
    requests = draw_requests(count, replicas, workload, seed)
    mean_reply = sum(workload.reply_tokens) / 2
    # No replica can finish requests faster than its top decode rate allows.
    low, high = 0.0, replicas * max(curve.tokens_per_s) / mean_reply
    best = None
    for _ in range(steps):
        rate = (low + high) / 2
        outcome = simulate(curve, workload, requests, replicas, rate)
        if outcome.ttft_p95 <= workload.ttft_target:
            low, best = rate, outcome
        else:
            high = rate
    return best


def saturated_rate(curve: Curve, workload: Workload, seed: int) -> float:
    """Requests/s of one replica that always has work waiting: every request arrives at once."""
    requests = draw_requests(workload.min_requests // 10, 1, workload, seed)
    simulation = Simulation(curve, workload, requests, 1)
    simulation.run(arrival_rate=1e9)
    return len(requests.unit_gaps) / float(np.max(simulation.finish))


# -- report ------------------------------------------------------------------------------------


def sweep(
    args: argparse.Namespace, workload: Workload, curves: dict[str, Curve]
) -> tuple[list[dict], dict[str, float]]:
    """Capacity rows for every backend and replica count, and each backend's saturated req/s."""
    rows, ceilings = [], {}
    for backend, curve in curves.items():
        single = None
        ceiling = ceilings[backend] = saturated_rate(curve, workload, args.seed)
        for replicas in args.replicas:
            started = time.perf_counter()
            outcome = capacity(curve, workload, replicas, args.seed, args.steps)
            elapsed = time.perf_counter() - started
            print(f"{backend} N={replicas}: {elapsed:.1f} s", file=sys.stderr, flush=True)
            if outcome is None:
                rows.append({"backend": backend, "replicas": replicas, "requests/s": "none"})
                continue
            single = single or (outcome.requests_per_s, replicas)
            rows.append(
                {
                    "backend": backend,
                    "replicas": replicas,
                    "arrival req/s": outcome.arrival_rate,
                    "requests/s": outcome.requests_per_s,
                    "tokens/s": outcome.tokens_per_s,
                    "TTFT p50 s": outcome.ttft_p50,
                    "TTFT p95 s": outcome.ttft_p95,
                    "ITL p50 ms": outcome.inter_token_p50_ms,
                    "efficiency": outcome.requests_per_s * single[1] / (single[0] * replicas),
                    "of saturated": outcome.requests_per_s / (ceiling * replicas),
                }
            )
    return rows, ceilings


def record_of(rows: list[dict], workload: Workload, seconds: float) -> dict:
    record: dict = {"ttft_target_s": workload.ttft_target, "runtime_s": round(seconds, 1)}
    for row in rows:
        prefix = f"{row['backend']}_n{row['replicas']}"
        if row["requests/s"] == "none":
            record[f"{prefix}_requests_per_s"] = None
            continue
        record[f"{prefix}_requests_per_s"] = round(row["requests/s"], 3)
        record[f"{prefix}_tokens_per_s"] = round(row["tokens/s"], 1)
        record[f"{prefix}_ttft_p50_s"] = round(row["TTFT p50 s"], 2)
        record[f"{prefix}_ttft_p95_s"] = round(row["TTFT p95 s"], 2)
        record[f"{prefix}_itl_p50_ms"] = round(row["ITL p50 ms"], 1)
        record[f"{prefix}_efficiency"] = round(row["efficiency"], 3)
        record[f"{prefix}_of_saturated"] = round(row["of saturated"], 3)
    return record


def markdown(
    args: argparse.Namespace,
    workload: Workload,
    curves: dict[str, Curve],
    rows: list[dict],
    ceilings: dict[str, float],
) -> str:
    command = " ".join(["python scripts/simulate_scale.py", *sys.argv[1:]])
    curve_lines = "\n".join(
        f"- {name}: {curve.describe()}.\n  Source: {curve.source}.\n  Saturated (every row "
        f"busy or prefilling): {ceilings[name]:.3g} requests/s per replica."
        for name, curve in curves.items()
    )
    columns = [
        "backend",
        "replicas",
        "arrival req/s",
        "requests/s",
        "tokens/s",
        "TTFT p50 s",
        "TTFT p95 s",
        "ITL p50 ms",
        "efficiency",
        "of saturated",
    ]
    w = workload
    return f"""## Simulated replicas (`scripts/simulate_scale.py`)

**This is a model fed with measured single-replica rates, not a measurement of a cluster.** No
Ray Serve deployment was run; the figures are what a discrete-event queueing simulation predicts
from the decode rates one replica reached on the 2-core CPU machine of docs/benchmarks.md
(SmolLM2-135M, float32).

Command: `{command}`

Per-replica decode rate: aggregate tokens/s by running streams, linear between the points,
through 0 at 0 streams, flat past the last point. At most {w.max_batch} rows run; the rest wait
in the replica's queue.

{curve_lines}

Request mix (role-play chat), drawn once per replica count with seed {args.seed}:
- arrivals: Poisson; routing: power of two choices (two different random replicas, the one
  with fewer ongoing requests, queued or running), as Ray Serve does;
- prompt: uniform integer in [{w.prompt_tokens[0]}, {w.prompt_tokens[1]}] tokens;
- reply: uniform integer in [{w.reply_tokens[0]}, {w.reply_tokens[1]}] tokens;
- steering: one of {w.configs} distinct configs per request, uniformly.

Assumptions (none of them measured):
- prefill: {w.prefill_rate:g} prompt tokens/s (`--prefill-rate`; a guess, set it from a
  measurement). As in steer's hf engine, the waiting requests that fit are prefilled together
  in one pass while the replica's decoding pauses; the first token comes at the end of that
  pass (TTFT = queueing + prefill).
- mixed steering: each distinct config in a batch beyond the first multiplies the decode rate
  by {w.config_slowdown:g}, floored at {w.slowdown_floor:g}. The hf curve was measured with a
  different slider on every stream, so for hf this cost is counted twice (conservative).
- context: decode speed does not depend on context length. The curves were measured with short
  prompts, so for contexts of thousands of tokens they are optimistic. No KV-cache memory
  limit, no network or front-end time, no replica failures.
- vllm is modelled like hf (whole-prompt prefill that pauses decoding); only its decode curve
  differs. vLLM's chunked prefill would lower TTFT under load.

Method: for each replica count, bisection ({args.steps} steps) on the arrival rate for the
highest rate whose p95 TTFT is at most {w.ttft_target:g} s, with {w.requests_per_replica}
requests per replica and at least {w.min_requests} per run, the first {w.warmup_fraction:.0%}
left out of the statistics. requests/s and tokens/s count the requests that finished while the
measured ones were arriving. ITL p50 is the median over requests of (finish - first token) /
(reply tokens - 1), prefill pauses included. Efficiency is requests/s per replica against
N = 1; "of saturated" is requests/s against N replicas that always have work waiting (all
requests queued at once, no TTFT bound), the most this model allows. An efficiency above 1 is
pooling, not faster replicas: under a p95 TTFT bound one replica must keep idle headroom for
bursts of arrivals, while with more replicas the router spreads a burst, so each replica runs
closer to saturation.

{table(rows, columns)}
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf,vllm", help="hf, vllm or hf,vllm")
    parser.add_argument("--replicas", default="1,2,4,8,16,32,64")
    parser.add_argument("--hf-curve", help="override, e.g. 1:17,4:40,16:118 (streams:tok/s)")
    parser.add_argument("--vllm-curve", help="override, e.g. 1:27,16:300 (streams:tok/s)")
    parser.add_argument("--ttft-target", type=float, default=5.0, help="p95 TTFT bound, seconds")
    parser.add_argument("--prefill-rate", type=float, default=2000.0, help="prompt tokens/s")
    parser.add_argument("--prompt-tokens", default="1000,4000", help="uniform range")
    parser.add_argument("--reply-tokens", default="150,400", help="uniform range")
    parser.add_argument("--configs", type=int, default=8, help="distinct steering configs")
    parser.add_argument("--config-slowdown", type=float, default=0.97)
    parser.add_argument("--slowdown-floor", type=float, default=0.8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--requests-per-replica", type=int, default=1000)
    parser.add_argument("--min-requests", type=int, default=20000, help="per simulated run")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=10, help="bisection steps per replica count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    args.replicas = [int(n) for n in args.replicas.split(",")]
    return args


def workload_of(args: argparse.Namespace) -> Workload:
    def span(text: str) -> tuple[int, int]:
        low, high = (int(v) for v in text.split(","))
        return low, high

    return Workload(
        prompt_tokens=span(args.prompt_tokens),
        reply_tokens=span(args.reply_tokens),
        configs=args.configs,
        config_slowdown=args.config_slowdown,
        slowdown_floor=args.slowdown_floor,
        prefill_rate=args.prefill_rate,
        max_batch=args.max_batch,
        ttft_target=args.ttft_target,
        requests_per_replica=args.requests_per_replica,
        min_requests=args.min_requests,
        warmup_fraction=args.warmup_fraction,
    )


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    workload = workload_of(args)
    benchmarks = DOCS / "benchmarks.md"
    curves = {
        backend: resolve_curve(backend, getattr(args, f"{backend}_curve"), benchmarks)
        for backend in args.backend.split(",")
    }
    rows, ceilings = sweep(args, workload, curves)
    record = record_of(rows, workload, time.perf_counter() - started)
    record["saturated_requests_per_s_per_replica"] = {k: round(v, 3) for k, v in ceilings.items()}
    record["curves"] = {name: curve.describe() for name, curve in curves.items()}
    emit(record)
    if not args.no_docs:
        text = markdown(args, workload, curves, rows, ceilings)
        write_section("scaling.md", "simulation", text, title="Scaling")


if __name__ == "__main__":
    main()
