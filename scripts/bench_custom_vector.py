"""Time for a custom steering vector with no recipe, end to end, on SmolLM2-135M-Instruct

What a user types, in a fresh process each time (imports, model load, replies, vector, sweep,
artifact)::

    steer directions compute --positive recipes/data/cheerful.txt \\
        --negative recipes/data/gloomy.txt --out OUT

``--repeats`` runs, best and median wall time, the load average before and after (the machine
is shared; numbers from a busy machine are marked). Then once in process, the time of each step
from the progress callbacks. Prints one JSON line; ``--write`` replaces the ``custom-vector``
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine, table, write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"
#: above this 1-minute load average per core before the runs, the machine is reported busy (the
#: runs themselves raise it: two threads for a minute put it near 1.5)
BUSY = 0.5


def end_to_end(out: Path, model: str) -> float:
    command = [
        sys.executable, "-m", "steer", "directions", "compute", "--model", model,
        "--positive", str(DATA / "cheerful.txt"), "--negative", str(DATA / "gloomy.txt"),
        "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def steps(model: str, out: Path) -> dict[str, float]:
    """Seconds per step of one in-process run (load included)."""
    from steer.directions.api import compute
    from steer.directions.recipe import load_direction_recipe
    from steer.models import load_model

    start = time.perf_counter()
    handle = load_model(model)
    seconds = {"load model": time.perf_counter() - start}
    recipe = load_direction_recipe(
        {
            "name": "cheerful-vs-gloomy",
            "kind": "steering",
            "data": {"positive": str(DATA / "cheerful.txt"), "negative": str(DATA / "gloomy.txt")},
        }
    )
    clock, current = [time.perf_counter()], [""]

    def progress(message: str, fraction: float) -> None:
        now = time.perf_counter()
        step = "sweep" if current[0].startswith("strength") else current[0]
        if step:
            seconds[step] = seconds.get(step, 0.0) + now - clock[0]
        clock[0], current[0] = now, message

    compute(handle, recipe, out, progress=progress, cancelled=threading.Event())
    return {step: round(value, 2) for step, value in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline name or path")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        runs = [end_to_end(Path(scratch) / f"run{i}", args.model) for i in range(args.repeats)]
        load_after = os.getloadavg()[0]
        breakdown = steps(args.model, Path(scratch) / "steps")
    record = {
        "benchmark": "custom-vector",
        "model": args.model,
        "examples": "8 + 8 (recipes/data/cheerful.txt, gloomy.txt)",
        "seconds_best": round(min(runs), 2),
        "seconds_median": round(statistics.median(runs), 2),
        "runs": [round(r, 2) for r in runs],
        "steps_seconds": breakdown,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quiet": load_before / cores <= BUSY,
        "machine": machine(),
    }
    emit(record)
    if args.write:
        write_section("benchmarks.md", "custom-vector", _markdown(record), title="Benchmarks")
    return 0


def _markdown(record: dict) -> str:
    steps_rows = [{"step": k, "seconds": v} for k, v in record["steps_seconds"].items()]
    quiet = "quiet" if record["quiet"] else "busy (other jobs running; times are upper bounds)"
    return f"""## Custom steering vector, no recipe (`scripts/bench_custom_vector.py`)

`steer directions compute --positive recipes/data/cheerful.txt --negative recipes/data/gloomy.txt
--out OUT` on {record["model"]}, {record["examples"]}, in a fresh process (imports, model load,
the model's replies, the vector at layer 18, the strength sweep, the artifact): best
**{record["seconds_best"]} s**, median {record["seconds_median"]} s of {len(record["runs"])} runs
({", ".join(str(r) for r in record["runs"])}). Goal: under a minute on a quiet machine.
Machine: {record["machine"]}; load average {record["load_average_before"]:.2f} before and
{record["load_average_after"]:.2f} after the runs, which raise it themselves ({quiet}).

One run in process, by step (the sweep measures 0 and then each side outwards until the first
strength over the KL bound):

{table(steps_rows, ["step", "seconds"])}
"""


if __name__ == "__main__":
    sys.exit(main())
