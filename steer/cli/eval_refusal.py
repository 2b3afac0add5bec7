"""``steer eval refusal``: refusal rate on harmful prompts and KL cost on harmless ones.

Prints one JSON line with ``refusal_rate``, ``n``, ``kl_first_token``, ``kl_multi_token`` (both 0
for the unedited model) and the wall time of each step. With no ``--harmful``/``--harmless``
files the recipe's held-out test splits are used. ``--direction DIR`` ablates the direction;
with ``--strength S`` it is added at its layer instead (S < 0 pushes away from refusing).
``--edits RECIPE.toml`` applies an edit recipe (the schema ``steer bake`` reads, e.g. the kernel
recipe ``steer directions optimize`` writes) at run time; ``--baked MODEL_DIR`` evaluates the
baked form of such edits against ``--model``, so the two results can be compared.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from steer.directions.evaluate import MATCHERS

if TYPE_CHECKING:
    from steer.directions.recipe import DirectionRecipe


def parser(prog: str, *, kind: str) -> argparse.ArgumentParser:
    from steer.directions.data import RECIPES_DIR

    refusal = kind == "refusal"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    parser.add_argument("--direction", help="direction artifact directory")
    parser.add_argument("--strength", type=float, help="add the direction with this strength")
    parser.add_argument("--edits", help="an edit recipe (TOML) applied at run time")
    parser.add_argument("--baked", help="an edited model directory, compared against --model")
    parser.add_argument(
        "--recipe", default=str(RECIPES_DIR / f"{'refusal' if refusal else 'moralizing'}.toml")
    )
    parser.add_argument(
        "--harmful" if refusal else "--prompts",
        dest="positive",
        help="prompts to measure the rate on (.txt/.jsonl/.csv or 'strongreject')",
    )
    parser.add_argument("--harmless", help="harmless prompts for the KL (default: held-out)")
    parser.add_argument("--column", help="CSV column / JSONL field of the prompt files")
    parser.add_argument("--max-new-tokens", type=int, help="greedy tokens per response")
    parser.add_argument(
        "--lengths",
        type=_lengths,
        default=(),
        help="also the rate over each reply's first N tokens, e.g. 16,64,128 "
        "(one generation at the longest; sets --max-new-tokens to it)",
    )
    parser.add_argument("--kl-tokens", type=int, help="teacher-forced tokens for multi-token KL")
    parser.add_argument("--max-test", type=int, help="cap on prompts per set (0 = all)")
    parser.add_argument("--judge", help="also judge responses with this chat model")
    parser.add_argument("--examples", type=int, default=0, help="include N example responses")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON line (default)")
    return parser


def run(argv: list[str], *, prog: str, kind: str) -> int:
    """Check the flags -> recipe -> prompts -> models and edits -> evaluate -> print."""
    args = parser(prog, kind=kind).parse_args(argv)
    from steer.directions.evaluate import evaluate_rate
    from steer.models import load_model

    _check_flags(args)
    recipe = _recipe(args)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    positive, negative = _prompts(args, recipe, kind)
    handle = load_model(args.model, dtype=args.dtype)
    edited = load_model(args.baked, dtype=args.dtype) if args.baked else None
    judge = load_model(args.judge, dtype=args.dtype) if args.judge else None
    interventions = _interventions(args, handle)
    seconds["load"] = time.perf_counter() - start
    report = evaluate_rate(
        handle,
        positive,
        negative,
        interventions,
        matcher=MATCHERS[kind],
        edited_handle=edited,
        judge_handle=judge,
        system=recipe.data.system or None,
        max_new_tokens=recipe.evaluate.max_new_tokens,
        kl_tokens=recipe.evaluate.kl_tokens,
        batch_size=recipe.evaluate.batch_size,
        lengths=args.lengths,
    )
    record: dict[str, Any] = {
        f"{kind}_rate": report.rate,
        "interval_95": list(report.interval),
        "max_new_tokens": recipe.evaluate.max_new_tokens,
        "by_length": [asdict(entry) for entry in report.by_length],
        "n": report.n,
        "kl_first_token": report.kl_first_token,
        "kl_multi_token": report.kl_multi_token,
        "n_kl": len(negative),
        "model": handle.name,
        "edit": args.baked or args.direction or args.edits or None,
        "strength": args.strength,
        "seconds": {**seconds, **report.seconds},
    }
    if report.judged_rate is not None:
        record[f"judged_{kind}_rate"] = report.judged_rate
        record["judge_agreement"] = report.judge_agreement
    if args.examples:
        record["examples"] = report.examples[: args.examples]
    print(json.dumps(record, default=float), flush=True)
    return 0


def _lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of token counts: {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1: {text!r}")
    return lengths


def _check_flags(args: argparse.Namespace) -> None:
    """--strength needs --direction; --direction, --edits and --baked exclude each other."""
    from steer.errors import InvalidArgumentError

    if args.strength is not None and args.direction is None:
        raise InvalidArgumentError("--strength needs --direction", field="strength")
    chosen = [flag for flag in ("direction", "edits", "baked") if getattr(args, flag)]
    if len(chosen) > 1:
        raise InvalidArgumentError(
            f"use one of --direction, --edits and --baked, not {' and '.join(chosen)}",
            field=chosen[1],
        )


def _recipe(args: argparse.Namespace) -> DirectionRecipe:
    """The direction recipe with the evaluation flags applied."""
    from steer.directions.recipe import load_direction_recipe, with_overrides

    return with_overrides(
        load_direction_recipe(args.recipe),
        {
            "evaluate.max_new_tokens": max(args.lengths) if args.lengths else args.max_new_tokens,
            "evaluate.kl_tokens": args.kl_tokens,
            "evaluate.max_test": args.max_test,
        },
    )


def _prompts(
    args: argparse.Namespace, recipe: DirectionRecipe, kind: str
) -> tuple[list[str], list[str]]:
    """(prompts to measure the rate on, harmless prompts for the KL): the files given, else the
    recipe's held-out test splits, capped at ``evaluate.max_test``."""
    from steer.directions.api import held_out
    from steer.directions.data import load_prompts

    positive, negative = held_out(recipe)
    if args.positive:
        positive = load_prompts(args.positive, column=args.column, field="harmful")
    if args.harmless:
        negative = load_prompts(args.harmless, column=args.column, field="harmless")
    elif kind == "moralizing":
        negative = _harmless_test()
    cap = recipe.evaluate.max_test
    if cap:
        positive, negative = positive[:cap], negative[:cap]
    return positive, negative


def _interventions(args: argparse.Namespace, handle: Any) -> tuple[Any, ...]:
    """The run-time edits: the direction's (ablated, or added at ``--strength``) or the edit
    recipe's; none for the unedited or a baked model."""
    from steer.artifacts import load_vector
    from steer.directions.api import interventions_for

    interventions: tuple[Any, ...] = ()
    if args.direction:
        artifact = load_vector(args.direction, handle=handle)
        interventions = interventions_for(artifact, strength=args.strength)
    if args.edits:
        interventions = recipe_interventions(args.edits, handle)
    return interventions


def recipe_interventions(recipe: Any, handle: Any) -> tuple[Any, ...]:
    """The run-time form of an edit recipe (an :class:`~steer.recipes.EditRecipe` or its
    path), its artifacts checked against ``handle`` (:meth:`EditRecipe.for_model`)."""
    from steer.recipes import EditRecipe, load_edit_recipe

    if not isinstance(recipe, EditRecipe):
        recipe = load_edit_recipe(recipe)
    return tuple(recipe.for_model(handle))


def _harmless_test() -> list[str]:
    from steer.directions.api import held_out
    from steer.directions.data import RECIPES_DIR
    from steer.directions.recipe import load_direction_recipe

    return held_out(load_direction_recipe(RECIPES_DIR / "refusal.toml"))[1]


def main(argv: list[str], *, prog: str = "steer eval refusal", command: str = "refusal") -> int:
    return run(argv, prog=prog, kind="refusal")
