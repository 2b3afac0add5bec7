"""One layer's refusal direction, plain and whitened at several shrinkages, on held-out data

Each direction is ablated and measured on the held-out splits; written to docs/results.md
("whitening").

The direction of ``--layer`` at ``--position`` is computed from the recipe's filtered train
prompts as ``steer directions compute`` does (``mean_difference``, or ``whitened`` by the
harmless train prompts' token covariance shrunk by each value of ``--shrinkage``); each one is
ablated with the run-time ``Ablate`` the search scores and ``steer eval refusal`` applies.
Reported per row: held-out refusal rate (greedy, phrase matcher), first-token and multi-token
KL on held-out harmless prompts, and the direction's *spread*: the standard deviation of the
harmless train tokens' projections over the gap between the two train means along it (lower
means an ablation moves harmless activations less per unit of refusal removed). Prints one JSON
line per row, then one with every row.

    python scripts/sweep_whitening.py --layer 15 --shrinkage none,0.3,0.1,0.05,0.02
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from report import emit, machine, table, write_section

from steer.activations import encode_chat
from steer.directions.api import filtered_train_activations, held_out, prepare
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import base_continuations, evaluate_rate
from steer.directions.methods import compute_direction, shrink
from steer.directions.recipe import load_recipe
from steer.directions.search import ablation, token_covariances
from steer.models import load_model
from steer.vectors import SteeringVector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--position", type=int, default=-1)
    parser.add_argument(
        "--shrinkage", default="none,0.3,0.1,0.05,0.02", help="'none' = plain mean difference"
    )
    parser.add_argument("--max-harmful", type=int, default=0, help="cap test prompts (0 = all)")
    parser.add_argument("--max-harmless", type=int, default=0, help="harmless prompts for KL")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    args = parser.parse_args()
    command = "python scripts/sweep_whitening.py " + " ".join(sys.argv[1:])
    recipe = load_recipe(args.recipe)
    handle = load_model(args.model)
    batch = recipe.search.batch_size

    prepared = prepare(handle, recipe)
    positive, negative, negative_prompts = filtered_train_activations(
        handle, prepared, (args.position,)
    )
    covariance = token_covariances(handle, negative_prompts, batch_size=batch)[args.layer]
    positive_rows = positive[:, args.layer, 0]
    negative_rows = negative[:, args.layer, 0]

    harmful, harmless = held_out(recipe)
    if args.max_harmful:
        harmful = harmful[: args.max_harmful]
    if args.max_harmless:
        harmless = harmless[: args.max_harmless]
    continuations = base_continuations(
        handle,
        [encode_chat(handle, p) for p in harmless],
        tokens=recipe.evaluate.kl_tokens,
        batch_size=recipe.evaluate.batch_size,
    )
    rows: list[dict[str, Any]] = []
    for value in args.shrinkage.split(","):
        plain = value.strip() == "none"
        method = "mean_difference" if plain else "whitened"
        shrunk = None if plain else shrink(covariance, float(value))
        direction = compute_direction(method, positive_rows, negative_rows, shrunk)
        start = time.perf_counter()
        report = evaluate_rate(
            handle,
            harmful,
            harmless,
            (ablation(SteeringVector.from_shared(direction)),),
            max_new_tokens=recipe.evaluate.max_new_tokens,
            kl_tokens=recipe.evaluate.kl_tokens,
            batch_size=recipe.evaluate.batch_size,
            continuations=continuations,
        )
        row = {
            "direction": "mean difference" if plain else f"whitened, shrinkage {value}",
            "spread": round(_spread(direction, positive_rows, negative_rows, covariance), 4),
            "refusal_rate": round(report.rate, 4),
            "kl_first_token": round(report.kl_first_token, 4),
            "kl_multi_token": round(report.kl_multi_token, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        emit(row)
        rows.append(row)
    record = {
        "model": handle.name,
        "layer": args.layer,
        "position": args.position,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "covariance_tokens": sum(len(prompt) - 1 for prompt in negative_prompts),
        "rows": rows,
    }
    emit(record)
    if not args.no_docs:
        write_section("results.md", "whitening", _markdown(record, command))
    return 0


def _spread(
    direction: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    covariance: torch.Tensor,
) -> float:
    """std of harmless tokens along the unit direction / gap between the train means."""
    unit = (direction / direction.norm()).double()
    gap = float((positive.double().mean(0) - negative.double().mean(0)) @ unit)
    return float((unit @ covariance @ unit).sqrt()) / gap


def _markdown(record: dict[str, Any], command: str) -> str:
    return "\n\n".join(
        [
            "## Whitening the refusal direction",
            f"Model `{record['model']}`; the direction of layer {record['layer']} at position "
            f"{record['position']} from the recipe's filtered train prompts, plain or whitened "
            "by the harmless train prompts' token covariance at each shrinkage; ablated at every "
            "layer (run-time `Ablate`). Held-out StrongREJECT test split "
            f"(n = {record['n_harmful']}), held-out harmless prompts for KL "
            f"(n = {record['n_harmless']}), greedy; covariance from "
            f"{record['covariance_tokens']} harmless train tokens. *spread*: standard deviation "
            "of the harmless "
            "train tokens along the direction over the gap between the two train means.",
            table(
                record["rows"],
                ["direction", "spread", "refusal_rate", "kl_first_token", "kl_multi_token"],
            ),
            f"Measured on {machine()}.",
            f"Command:\n\n```\n{command}\n```",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
