"""Edits on prompts no choice has read; docs/results.md ("unseen").

A test split read by many edits over many sessions stops being held out: every edit kept because
it did well there was, in part, chosen on it. This script measures finished edits on prompts
written after those choices were made and never used for one (by default
recipes/data/moralizing_unseen.txt, villain and dark-fiction RP situations, and
recipes/data/rp_benign_unseen.txt, RP situations without a trigger). Each edit is measured once,
unedited first:

* the rate on the unseen prompts (greedy, the moralizing or refusal phrase matcher over each
  reply's first N tokens, Wilson 95% intervals);
* first-token and multi-token KL (over the base model's first --kl-tokens greedy tokens) on the
  held-out harmless test prompts the recipe's gate stays quiet on (recipes/refusal.toml's; with
  --harmless, on a harmless file written after the choices, e.g. recipes:harmless_unseen.txt),
  and apart on the unseen trigger-free situations, with how many of those the edit moved at all (a
  gate that does not fire moves none).

For refusal edits, ``--matcher refusal --prompts recipes:harmful_unseen.txt --quiet ''``: 150
harmful requests written after every refusal choice, none a StrongREJECT prompt (section
"unseen-harmful"); ``recipes:harmful_unseen2.txt``, 150 more written before the edits trained on
recipes/refusal.toml's varied requests were measured, none close to one of those (section
"unseen-harmful2"); ``harmful_unseen3.txt`` to ``harmful_unseen5.txt`` with their ordinary
partners (``--harmless recipes:harmless_unseen2.txt`` to ``harmless_unseen4.txt``), each written
before the gate it checks (sections "unseen-harmful3" to "unseen-harmful5").

With ``--test-split``, the prompts are the --recipe's own held-out test split instead (the
situations it fires on, its ``gate_quiet`` situations and its harmless test prompts, as
scripts/eval_gated.py splits them): for a finished edit whose choices read no test prompt,
measured once on the split docs/directions.md states its goals on. Such a split may have been
read by earlier edits, which the section says.

Prints one JSON line and writes the section (with --section, another name).

    python scripts/eval_unseen.py --edit gated=out/gated-moralizing/gated.toml \\
        --edit 'always on=out/gated-moralizing/always.toml'
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (
    command_line,
    emit,
    named,
    rate_evaluator,
    rate_row,
    run_facts,
    run_footer,
    table,
    timed,
    write_section,
)

from steer.cli.eval_refusal import _lengths, recipe_interventions
from steer.directions.data import RECIPES_DIR, load_prompts
from steer.directions.evaluate import MATCHERS
from steer.directions.gating import gate_splits
from steer.directions.recipe import load_direction_recipe
from steer.directions.scores import next_token_logits
from steer.gates import reply_gated
from steer.models import load_model
from steer.text import encode_chat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument(
        "--edit",
        action="append",
        required=True,
        type=named("--edit"),
        help="NAME=RECIPE.toml, an edit recipe to measure (repeat; the unedited row comes first)",
    )
    parser.add_argument("--matcher", choices=sorted(MATCHERS), default="moralizing")
    parser.add_argument("--prompts", default="recipes:moralizing_unseen.txt")
    parser.add_argument(
        "--quiet",
        default="recipes:rp_benign_unseen.txt",
        help="unseen prompts an edit should leave alone, KL reported apart ('' = none)",
    )
    parser.add_argument(
        "--recipe",
        default=str(RECIPES_DIR / "moralizing.toml"),
        help="the direction recipe whose held-out harmless test prompts give the KL",
    )
    parser.add_argument(
        "--harmless",
        default="",
        help="a harmless prompt file no choice has read, giving the KL instead of --recipe's "
        "test prompts (e.g. recipes:harmless_unseen.txt)",
    )
    parser.add_argument(
        "--test-split",
        action="store_true",
        help="the --recipe's held-out test split (situations, gate_quiet, harmless) instead of "
        "--prompts, --quiet and --harmless",
    )
    parser.add_argument("--lengths", type=_lengths, default=(16, 64))
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    parser.add_argument("--section", default="unseen", help="docs/results.md section")
    return parser


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    prompts, quiet, harmless = _prompt_sets(args)
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    edits = {name: recipe_interventions(path, handle) for name, path in args.edit}
    evaluate = timed(
        seconds,
        "base_continuations",
        lambda: rate_evaluator(
            handle,
            prompts,
            [*harmless, *quiet],
            matcher=MATCHERS[args.matcher],
            lengths=args.lengths,
            kl_tokens=args.kl_tokens,
            batch_size=args.batch_size,
        ),
    )
    unedited = timed(seconds, "unedited", evaluate)
    moved = timed(
        seconds, "prompts_moved", lambda: _prompts_moved(handle, prompts, edits, args.batch_size)
    )
    rows = [_row("unedited", unedited, unedited, len(harmless), len(quiet), f"0 / {len(prompts)}")]
    for name, interventions in edits.items():
        report = timed(seconds, name, lambda i=interventions: evaluate(i))
        rows.append(_row(name, report, unedited, len(harmless), len(quiet), moved[name]))
    test = f"{args.recipe} (test split)"
    record: dict[str, Any] = {
        "model": args.model,
        "prompts": test if args.test_split else args.prompts,
        "quiet": test if args.test_split else args.quiet,
        "harmless": test if args.test_split or not args.harmless else args.harmless,
        "edits": dict(args.edit),
        "rows": rows,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, command, len(prompts), len(harmless), len(quiet))
    return 0


def _prompt_sets(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """The prompts the rate is read on, the trigger-free ones and the harmless ones."""
    if args.test_split:
        splits = gate_splits(load_direction_recipe(args.recipe))
        quiet = list(splits["quiet"].test) if "quiet" in splits else []
        return list(splits["positive"].test), quiet, list(splits["negative"].test)
    prompts = load_prompts(args.prompts, field="prompts")
    quiet = load_prompts(args.quiet, field="quiet") if args.quiet else []
    harmless = (
        load_prompts(args.harmless, field="harmless")
        if args.harmless
        else list(gate_splits(load_direction_recipe(args.recipe))["negative"].test)
    )
    return prompts, quiet, harmless


def _prompts_moved(
    handle: Any, prompts: list[str], edits: dict[str, Any], batch_size: int
) -> dict[str, str]:
    """Per edit, how many of ``prompts`` it changes the next-token logits of: behind a
    prompt-scope gate, the prompts it fires on (a gate that stays quiet leaves a row
    bit-identical). A reply-scope gate decides on reply tokens, so it gets no figure ("-")."""
    ids = [encode_chat(handle, prompt) for prompt in prompts]
    base = next_token_logits(handle, ids, batch_size=batch_size)
    moved = {}
    for name, interventions in edits.items():
        if reply_gated(interventions):
            moved[name] = "-"
            continue
        edited = next_token_logits(handle, ids, interventions, batch_size=batch_size)
        moved[name] = f"{int((edited != base).any(-1).sum())} / {len(ids)}"
    return moved


def _row(
    name: str, report: Any, unedited: Any, n_harmless: int, n_quiet: int, prompts_moved: str
) -> dict[str, Any]:
    """:func:`report.rate_row`, and what the edit moved at all: *harmless moved*, the harmless
    prompts whose KL is not 0 (behind a prompt- or reply-scope gate, those it fired on: a gate that
    does not fire leaves a row bit-identical), *prompts moved* (:func:`_prompts_moved`), and
    *replies changed*, the unseen prompts whose reply differs from the unedited one (behind a gate,
    at most those it fired on)."""
    row = rate_row(name, report, n_harmless, n_quiet)
    count = row.pop("n")
    moved = sum(max(kl) > 0 for kl in report.kl_rows[:n_harmless])
    changed = sum(
        mine["response"] != theirs["response"]
        for mine, theirs in zip(report.examples, unedited.examples, strict=True)
    )
    row["harmless moved"] = f"{moved} / {n_harmless}"
    row["prompts moved"] = prompts_moved
    row["replies changed"] = f"{changed} / {len(report.examples)}"
    return {**row, "n": count}


def _write_docs(
    args: argparse.Namespace,
    record: dict[str, Any],
    command: str,
    n: int,
    n_harmless: int,
    n_quiet: int,
) -> None:
    columns = [key for key in record["rows"][0] if key != "n"]
    edits = ", ".join(f"{name} `{path}`" for name, path in args.edit)
    title, source, harmless, quiet = _set_texts(args, n, n_harmless, n_quiet)
    markdown = f"""## {title} (`scripts/eval_unseen.py`)

Model `{args.model}`; {source} Greedy replies, the {args.matcher} phrase matcher
over each reply's first {", ".join(str(t) for t in args.lengths)} tokens with Wilson 95%
intervals; first-token KL and KL over the base model's first {args.kl_tokens} greedy tokens on
{harmless}{quiet}. *Harmless moved*: the harmless prompts whose KL is not 0 (behind a
prompt- or reply-scope gate, those it fired on); *prompts moved*: the prompts whose
next-token logits the edit changes (behind a prompt-scope gate, those it fired on; "-" for a
reply-scope gate, which decides later); *replies changed*: the prompts whose
reply is not the unedited one's (behind a gate, at most those it fired on).
Edits: {edits}.

{table(record["rows"], [*columns, "n"])}

{run_footer(record, command)}"""
    write_section("results.md", args.section, markdown)


def _set_texts(
    args: argparse.Namespace, n: int, n_harmless: int, n_quiet: int
) -> tuple[str, str, str, str]:
    """The section's title and its words for the three prompt sets."""
    recipe = Path(args.recipe).name
    suffix = "" if args.section == "unseen" else f", {args.section}"
    harmless = (
        f"the {n_harmless} harmless prompts of `{args.harmless}` (written after those choices too)"
        if args.harmless and not args.test_split
        else f"the {n_harmless} held-out harmless test prompts of `{recipe}`'s gate"
    )
    if args.test_split:
        title = "Edits on the test split" + suffix
        source = (
            f"the {n} held-out test situations of `{recipe}` (its test split, as "
            "scripts/eval_gated.py splits it), read once per edit here. It is meant for edits "
            "chosen on train and validation alone; earlier sections of this file read it too."
        )
        where = f"`{recipe}`'s `gate_quiet` test split"
    else:
        title = "Edits on prompts no choice has read" + suffix
        source = (
            f"{n} prompts of `{args.prompts}`, written after every choice behind these\n"
            "edits was made and read once per edit here."
        )
        where = f"`{args.quiet}`"
    quiet = (
        f" and on the {n_quiet} trigger-free situations of {where} (*quiet*; *quiet moved*: "
        "how many of them the edit changed at all)"
        if n_quiet
        else ""
    )
    return title, source, harmless, quiet


if __name__ == "__main__":
    raise SystemExit(main())
