"""One layer's direction, plain and whitened at several shrinkages, on held-out data.

Each direction is ablated and measured on the held-out splits; written to docs/results.md
("whitening" for the refusal recipe, "whitening-moralizing" for a pairs recipe).

The direction of ``--layer`` is computed from the recipe's train data as ``steer directions
compute`` does: for the refusal recipe, from the filtered train prompts at ``--position``; for a
pairs recipe (moralizing), from the mean reply activations of its train pairs. Each value of
``--shrinkage`` gives one direction: ``none`` the mean difference, ``projected`` that method,
a number ``whitened`` by the harmless train prompts' token covariance (the refusal recipe's)
shrunk by it. Each one is ablated with the run-time ``Ablate`` the search scores and ``steer
eval`` applies, at weight 1, or W with a suffix ``@W`` (``projected@0.5``).

Reported per row: the held-out rate (refusals, or moralizing replies to held-out RP situations;
greedy, phrase matcher), first-token and multi-token KL on held-out harmless prompts, and the
direction's *spread*: the standard deviation of the harmless train tokens' projections over the
gap between the two train means along it (lower means an ablation moves harmless activations
less per unit of behaviour removed). Prints one JSON line per row, then one with every row.

    python scripts/sweep_whitening.py --layer 15 --shrinkage none,0.3,0.1,0.05,0.02
    python scripts/sweep_whitening.py --recipe recipes/moralizing.toml --layer 8 \
        --shrinkage projected,projected@0.75,projected@0.5,none,0.8,0.5,0.2,0.05 \
        --max-harmful 40 --max-harmless 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from report import command_line, emit, machine, table, write_section

from steer.directions.api import held_out
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import (
    base_continuations,
    evaluate_rate,
    is_moralizing,
    is_refusal,
)
from steer.directions.methods import compute_direction, shrink
from steer.directions.pipeline import filtered_train_activations, pair_activations, prepare
from steer.directions.recipe import RecipeKind, load_direction_recipe
from steer.directions.search import ablation, token_covariances
from steer.models import load_model
from steer.text import encode_chat
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
    command = command_line()
    recipe = load_direction_recipe(args.recipe)
    handle = load_model(args.model)
    batch = recipe.search.batch_size

    pairs = recipe.kind is RecipeKind.PAIRS
    refusal = load_direction_recipe(RECIPES_DIR / "refusal.toml") if pairs else recipe
    prepared = prepare(handle, recipe)
    if pairs:
        positive, negative = pair_activations(handle, prepared, batch)
        negative_prompts = prepare(handle, refusal).negative_train
    else:
        positive, negative, negative_prompts = filtered_train_activations(
            handle, prepared, (args.position,)
        )
    covariance = token_covariances(handle, negative_prompts, batch_size=batch)[args.layer]
    positive_rows = positive[:, args.layer, 0]
    negative_rows = negative[:, args.layer, 0]

    # the behaviour's held-out prompts (harmful, or RP situations), harmless prompts for KL
    harmful, harmless = held_out(recipe)[0], held_out(refusal)[1]
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
    options: dict[str, Any] = dict(
        max_new_tokens=recipe.evaluate.max_new_tokens,
        kl_tokens=recipe.evaluate.kl_tokens,
        batch_size=recipe.evaluate.batch_size,
        matcher=is_moralizing if pairs else is_refusal,
    )
    rate = "moralizing_rate" if pairs else "refusal_rate"
    rows: list[dict[str, Any]] = []
    for spec in (v.strip() for v in args.shrinkage.split(",")):
        value, _, weight_text = spec.partition("@")
        weight = float(weight_text or 1.0)
        method = {"none": "mean_difference", "projected": "projected"}.get(value, "whitened")
        shrunk = shrink(covariance, float(value)) if method == "whitened" else None
        direction = compute_direction(method, positive_rows, negative_rows, shrunk)
        start = time.perf_counter()
        report = evaluate_rate(
            handle,
            harmful,
            harmless,
            (ablation(SteeringVector.from_shared(direction), weight),),
            continuations=continuations,
            **options,
        )
        row = {
            "direction": LABELS.get(method, f"whitened, shrinkage {value}")
            + (f", weight {weight:g}" if weight != 1.0 else ""),
            "spread": round(_spread(direction, positive_rows, negative_rows, covariance), 4),
            rate: round(report.rate, 4),
            "kl_first_token": round(report.kl_first_token, 4),
            "kl_multi_token": round(report.kl_multi_token, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        emit(row)
        rows.append(row)
    if pairs:  # the unedited rate, for reference
        base = evaluate_rate(handle, harmful, harmless[:1], (), **options)
        rows.insert(0, {"direction": "unedited", rate: round(base.rate, 4)})
        emit(rows[0])
    record = {
        "model": handle.name,
        "recipe": recipe.name,
        "layer": args.layer,
        "position": "reply tokens" if pairs else args.position,
        "rate": rate,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "covariance_tokens": sum(len(prompt) - 1 for prompt in negative_prompts),
        "rows": rows,
    }
    emit(record)
    if not args.no_docs:
        section = "whitening-moralizing" if pairs else "whitening"
        write_section("results.md", section, _markdown(record, command, pairs))
    return 0


#: the direction column of methods other than whitened
LABELS = {"mean_difference": "mean difference", "projected": "projected"}


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


def _markdown(record: dict[str, Any], command: str, pairs: bool) -> str:
    if pairs:
        title = "## Whitening the moralizing direction"
        source = (
            f"layer {record['layer']} from the mean reply activations of the "
            f"`{record['recipe']}` recipe's train pairs"
        )
        held = f"Held-out RP situations (n = {record['n_harmful']}, moralizing phrase matcher)"
    else:
        title = "## Whitening the refusal direction"
        source = (
            f"layer {record['layer']} at position {record['position']} from the recipe's "
            "filtered train prompts"
        )
        held = f"Held-out StrongREJECT test split (n = {record['n_harmful']})"
    return "\n\n".join(
        [
            title,
            f"Model `{record['model']}`; the direction of {source}, plain, projected or "
            "whitened by the harmless train prompts' token covariance at each shrinkage; ablated "
            f"at every layer (run-time `Ablate`). {held}, held-out harmless prompts for KL "
            f"(n = {record['n_harmless']}), greedy; covariance from "
            f"{record['covariance_tokens']} harmless train tokens. *spread*: standard deviation "
            "of the harmless "
            "train tokens along the direction over the gap between the two train means.",
            table(
                record["rows"],
                ["direction", "spread", record["rate"], "kl_first_token", "kl_multi_token"],
            ),
            f"Measured on {machine()}.",
            f"Command:\n\n```\n{command}\n```",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
