"""Moralizing directions, measured per model, written to docs/results.md ("moralizing").

For each model: compute the direction with recipes/moralizing.toml (reply-token activations of
in-character vs moralizing replies), then the moralizing rate of the unedited and the edited
model on the held-out RP situations (greedy, phrase matcher), and first-token / multi-token KL on
held-out harmless instructions. Each step is timed; one JSON line per model.

    python scripts/eval_moralizing.py --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, machine, table, write_section

from steer.artifacts import load_vector
from steer.cli.directions import _layers
from steer.directions.api import compute, held_out, interventions_for
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import evaluate_rate, is_moralizing
from steer.directions.recipe import load_direction_recipe, with_overrides
from steer.models import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "moralizing.toml"))
    parser.add_argument("--out", default="/tmp/steer-moralizing")
    parser.add_argument("--max-situations", type=int, default=0, help="cap (0 = all held-out)")
    parser.add_argument("--max-harmless", type=int, default=16, help="harmless prompts for KL")
    parser.add_argument("--max-train", type=int, help="override data.max_train")
    parser.add_argument("--max-validation", type=int, help="override data.max_validation")
    parser.add_argument("--layers", type=_layers, help="override search.layers")
    parser.add_argument("--top-k", type=int, help="override search.top_k")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    command = command_line()
    recipe = with_overrides(
        load_direction_recipe(args.recipe),
        {
            "data.max_train": args.max_train,
            "data.max_validation": args.max_validation,
            "search.layers": args.layers,
            "search.top_k": args.top_k,
        },
    )
    situations, _ = held_out(recipe)
    if args.max_situations:
        situations = situations[: args.max_situations]
    harmless = held_out(load_direction_recipe(RECIPES_DIR / "refusal.toml"))[1][: args.max_harmless]
    records = []
    for name in args.models.split(","):
        record = measure(name, recipe, situations, harmless, Path(args.out) / name)
        emit(record)
        records.append(record)
        # written after every model, so a long second model never loses the first's numbers
        if not args.no_docs:
            write_section("results.md", "moralizing", _markdown(records, command), title="results")
    return 0


def measure(
    name: str, recipe: Any, situations: list[str], harmless: list[str], out: Path
) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    handle = load_model(name)
    seconds["load_model"] = time.perf_counter() - start
    start = time.perf_counter()
    directory = compute(handle, recipe, out, progress=_progress, cancelled=threading.Event())
    seconds["compute_direction"] = time.perf_counter() - start
    artifact = load_vector(directory, handle=handle)
    options = dict(
        matcher=is_moralizing,
        max_new_tokens=recipe.evaluate.max_new_tokens,
        kl_tokens=recipe.evaluate.kl_tokens,
        batch_size=recipe.evaluate.batch_size,
    )
    start = time.perf_counter()
    base = evaluate_rate(handle, situations, harmless, (), **options)  # type: ignore[arg-type]
    seconds["evaluate_base"] = time.perf_counter() - start
    start = time.perf_counter()
    edited = evaluate_rate(
        handle,
        situations,
        harmless,
        interventions_for(artifact),
        **options,  # type: ignore[arg-type]
    )
    seconds["evaluate_edited"] = time.perf_counter() - start
    metadata = dict(artifact.metadata)
    return {
        "script": "eval_moralizing",
        "model": name,
        "direction": str(directory),
        "layer": metadata.get("layer"),
        "validation": metadata.get("metrics"),
        "n_situations": base.n,
        "n_harmless": len(harmless),
        "moralizing_rate_base": base.rate,
        "moralizing_rate_edited": edited.rate,
        "kl_first_token": edited.kl_first_token,
        "kl_multi_token": edited.kl_multi_token,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": machine(),
        "example_base": base.examples[0]["response"] if base.examples else "",
        "example_edited": edited.examples[0]["response"] if edited.examples else "",
    }


def _progress(message: str, fraction: float) -> None:
    print(f"[{fraction:5.1%}] {message}", file=sys.stderr, flush=True)


def _markdown(records: list[dict[str, Any]], command: str) -> str:
    rows = [
        {
            "model": r["model"],
            "layer": "per-layer" if r["layer"] is None else r["layer"],
            "moralizing rate before": r["moralizing_rate_base"],
            "after": r["moralizing_rate_edited"],
            "first-token KL": r["kl_first_token"],
            "multi-token KL": r["kl_multi_token"],
            "wall times (s)": ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()),
        }
        for r in records
    ]
    columns = list(rows[0]) if rows else []
    first = records[0] if records else {}
    return "\n".join(
        [
            "## Moralizing direction",
            "",
            f"Held-out RP situations from recipes/data/moralizing_pairs.jsonl "
            f"(n = {first.get('n_situations')}), greedy, moralizing phrase matcher of "
            f"`steer.directions.evaluate`; KL on held-out harmless instructions "
            f"(n = {first.get('n_harmless')}). Direction ablated at every layer.",
            "",
            table(rows, columns),
            "",
            f"Measured on {first.get('machine')}.",
            "",
            "Command:",
            "",
            "```",
            command,
            "```",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
