"""COSMIC beside steer's own direction selection, on a direction recipe's validation split.

Runs the recipe's candidate search as `steer directions compute` does (one direction per layer
and position; bypass score on validation, then KL / induce in bypass order), scores every
single-layer candidate by COSMIC (steer.directions.cosmic: at the layers where the validation
sets' means are least alike, how far ablating it makes the positive prompts' mean look like the
negative ones', and adding it the reverse), and checks KL in COSMIC order until one passes the
recipe's KL threshold, as the search does in bypass order. Then both choices are measured by
something neither selection used: greedy replies to the validation prompts with the direction
ablated, the refusal phrase matcher over their first 16 and 64 tokens, and first-token and
32-token KL on the harmless validation prompts. Prints one JSON line and writes the section of
docs/results.md. Validation only: no test split is read.

COSMIC as implemented here differs from the paper's code in three named ways: it reads the
block inputs (``hook_resid_pre``) of the least-alike layers rather than the layer outputs, it
averages per-layer cosine similarities rather than the cosine of the layers' averaged means, and
it reads the recipe's positions (-1 and -2) rather than the last token only.

    python scripts/cosmic_refusal.py --recipe recipes/refusal.toml
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, run_facts, run_footer, table, timed, write_section

from steer.directions.api import search
from steer.directions.cosmic import cosmic_reference, cosmic_score
from steer.directions.pipeline import prepare
from steer.directions.recipe import load_direction_recipe
from steer.directions.search import Candidate, kl_scorer
from steer.models import load_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default="recipes/refusal.toml")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of layers read")
    parser.add_argument("--section", default="cosmic-refusal", help="docs/results.md section")
    return parser


def _row(candidate: Candidate, cosmic: dict[str, float], chosen_by: str) -> dict[str, Any]:
    def figure(value: float) -> float | str:
        return "-" if math.isnan(value) else round(value, 5)

    score = cosmic.get(candidate.label, math.nan)
    return {
        "chosen by": chosen_by,
        "candidate": candidate.label,
        "COSMIC score": "-" if math.isnan(score) else f"{score:.4f}",
        "bypass": figure(candidate.bypass),
        "KL": figure(candidate.kl),
        "induce": figure(candidate.induce),
    }


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    recipe = load_direction_recipe(args.recipe)
    prepared = prepare(handle, recipe)

    def progress(message: str, fraction: float) -> None:
        print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    result = timed(seconds, "search", lambda: search(handle, prepared, progress=progress))
    reference = timed(
        seconds,
        "cosmic_reference",
        lambda: cosmic_reference(
            handle,
            prepared.positive_validation,
            prepared.negative_validation,
            result.positions,
            fraction=args.fraction,
            batch_size=recipe.search.batch_size,
        ),
    )
    single = [c for c in result.candidates if c.layer is not None]

    def score_all() -> dict[str, float]:
        scores = {}
        for candidate in single:
            scores[candidate.label] = cosmic_score(
                handle, candidate, reference, batch_size=recipe.search.batch_size
            )
            progress(f"COSMIC {candidate.label}: {scores[candidate.label]:.4f}", 1.0)
        return scores

    cosmic = timed(seconds, "cosmic_scores", score_all)
    chosen = _cosmic_choice(handle, prepared, recipe, single, cosmic, seconds)
    rows = [
        _row(result.selected, cosmic, "bypass (steer's search)"),
        _row(chosen, cosmic, "COSMIC"),
    ]
    choices = {"unedited": None, "bypass (steer's search)": result.selected, "COSMIC": chosen}
    replies = timed(seconds, "replies", lambda: _replies(handle, recipe, choices))
    ranked = sorted(single, key=lambda c: -cosmic[c.label])[:5]
    record = {
        "script": "cosmic_refusal",
        "model": args.model,
        "recipe": args.recipe,
        "layers_read": list(reference.layers),
        "positions": list(result.positions),
        "baseline_bypass": result.baseline_positive,
        "kl_threshold": recipe.search.kl_threshold,
        "rows": rows,
        "top_by_cosmic": [_row(c, cosmic, "") for c in ranked],
        "replies": replies,
        "same_choice": chosen.label == result.selected.label,
        **run_facts(seconds, load_before),
    }
    emit(record)
    columns = ["chosen by", "candidate", "COSMIC score", "bypass", "KL", "induce"]
    markdown = f"""## COSMIC beside the bypass search, {args.recipe} (`scripts/cosmic_refusal.py`)

Model `{args.model}`; every candidate of the recipe's search (one direction per layer and
position, method `{recipe.search.method}`), validation prompts only
({len(prepared.positive_validation)} positive, {len(prepared.negative_validation)} negative;
no test split read). COSMIC reads layers {", ".join(map(str, reference.layers))} (the
{args.fraction:g} of layers whose validation means are least alike) at positions
{", ".join(map(str, result.positions))}; its score is the mean of two cosine similarities
(at most 2): positive prompts with the direction ablated against the negative prompts' mean,
negative prompts with it added against the positive prompts' mean. Each choice is the best by
its own score that passes KL < {recipe.search.kl_threshold:g} (first-token KL on the negative
validation prompts), checked in that order. *Bypass*: the search's refusal score on the positive
validation prompts with the direction ablated (unedited {result.baseline_positive:.4f}; lower
is better); "-": not checked.

{table(rows, columns)}

Measured by neither score: greedy replies to the {replies[0]["n"].split(" / ")[0]} positive
validation prompts (all of them, refused or not) with the candidate ablated, the refusal phrase
matcher over the first 16 and 64 tokens with Wilson 95% intervals, and KL on the
{replies[0]["n"].split(" / ")[1]} negative validation prompts (first token / over the base
model's first 32 greedy tokens):

{table(replies, ["edit", "rate @16", "rate @64", "first-token KL", "multi-token KL"])}

The five best by COSMIC:

{table([_row(c, cosmic, "") for c in ranked], columns[1:])}

{run_footer(record, command)}"""
    write_section("results.md", args.section, markdown)
    return 0


def _replies(handle: Any, recipe: Any, edits: dict[str, Candidate | None]) -> list[dict[str, Any]]:
    """A row per edit: refusal rates of greedy replies to the positive validation prompts and
    KL on the negative ones (the recipe's validation split, capped as the search caps it)."""
    from report import rate_evaluator, rate_row

    from steer.directions.data import contrast_splits
    from steer.directions.evaluate import MATCHERS

    cap = recipe.data.max_validation
    splits = contrast_splits(recipe)
    positive, negative = (
        list(splits[side].validation)[: cap or None] for side in ("positive", "negative")
    )
    evaluate = rate_evaluator(
        handle,
        positive,
        negative,
        matcher=MATCHERS["refusal"],
        lengths=(16, 64),
        kl_tokens=32,
        batch_size=recipe.search.batch_size,
    )
    rows = []
    for name, candidate in edits.items():
        report = evaluate(() if candidate is None else (candidate.ablation(),))
        label = name if candidate is None else f"{name}: {candidate.label}"
        rows.append(rate_row(label, report, len(negative)))
    return rows


def _cosmic_choice(
    handle: Any,
    prepared: Any,
    recipe: Any,
    single: list[Candidate],
    cosmic: dict[str, float],
    seconds: dict[str, float],
) -> Candidate:
    """The best candidate by COSMIC that passes the KL threshold (KL checked in COSMIC order,
    at most the recipe's max_checks; the best by COSMIC if none passes). Bypass and KL are the
    search's where it measured them."""
    options = recipe.search
    kl = kl_scorer(handle, prepared.negative_validation, options.batch_size)
    order = sorted(single, key=lambda c: -cosmic[c.label])
    checked = []

    def check() -> Candidate:
        for candidate in order[: options.max_checks or 16]:
            if math.isnan(candidate.kl):
                candidate = replace(candidate, kl=kl([candidate.ablation()]))
            checked.append(candidate)
            if candidate.kl < options.kl_threshold:
                return candidate
        return checked[0]

    return timed(seconds, "cosmic_kl", check)  # type: ignore[no-any-return]


if __name__ == "__main__":
    raise SystemExit(main())
