"""The refusal matcher beside a judge model, on long replies; docs/results.md ("judge").

A seeded sample of the refusal recipe's held-out harmful test prompts is answered greedily by
the unedited model and with each --edits recipe (run time, gates included), up to the longest
of --lengths tokens. Each reply is scored by steer's phrase matcher over its first N tokens for
each N (Wilson 95% intervals), and the whole reply by the judge (steer.directions.evaluate.judge:
"did the assistant do what the user asked?", read against the same prompt answered by a plain
refusal and a plain compliance). The table gives both rates, their agreement, the two kinds of
disagreement, and a few disagreeing replies. Nothing here chooses a parameter: the edits were
chosen on train / validation by the scripts that made them. KL is not measured here.

    python scripts/eval_judge.py --edits "always on=out/always.toml" --edits gated=out/gated.toml
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_block, command_line, emit, named, run_facts, table, timed, write_section

from steer.cli.eval_refusal import _lengths, recipe_interventions
from steer.directions.api import contrast_splits
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import RateReport, evaluate_rate, is_refusal, wilson_interval
from steer.directions.recipe import load_direction_recipe
from steer.models import load_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--judge", help="the judge model (default: --model itself)")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument(
        "--edits", action="append", default=[], type=named("--edits"), metavar="NAME=TOML"
    )
    parser.add_argument("--sample", type=int, default=48, help="harmful test prompts (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--lengths", type=_lengths, default=(16, 64, 128))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples", type=int, default=2, help="disagreements shown per edit")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    parser.add_argument("--section", default="judge", help="docs/results.md section")
    return parser


def _row(name: str, report: RateReport) -> dict[str, Any]:
    row: dict[str, Any] = {"edit": name}
    for entry in report.by_length:
        row[f"matcher @{entry.tokens}"] = f"{entry.rate:.3f} [{entry.low:.3f}, {entry.high:.3f}]"
    hits = [bool(example["hit"]) for example in report.examples]
    verdicts = [bool(example["judged"]) for example in report.examples]
    low, high = wilson_interval(sum(verdicts), len(verdicts))
    row["judge"] = f"{report.judged_rate:.3f} [{low:.3f}, {high:.3f}]"
    row["agreement"] = report.judge_agreement
    row["matcher only"] = sum(h and not v for h, v in zip(hits, verdicts, strict=True))
    row["judge only"] = sum(v and not h for h, v in zip(hits, verdicts, strict=True))
    row["n"] = report.n
    return row


def _disagreements(name: str, report: RateReport, count: int) -> list[str]:
    lines: list[str] = []
    for example in report.examples:
        if example["hit"] != example["judged"] and len(lines) < count:
            side = "matcher says refusal" if example["hit"] else "judge says refusal"
            reply = " ".join(example["response"].split())[:240]
            lines.append(f"- {name}, {side}: *{example['prompt'][:100]}* -> {reply}")
    return lines


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    judge = handle if args.judge is None else load_model(args.judge)
    harmful = list(contrast_splits(load_direction_recipe(args.recipe))["positive"].test)
    if args.sample and args.sample < len(harmful):
        harmful = random.Random(args.seed).sample(harmful, args.sample)
    edits = [("unedited", ())] + [
        (name, recipe_interventions(path, handle)) for name, path in args.edits
    ]
    reports = {
        name: timed(
            seconds,
            name,
            lambda interventions=interventions: evaluate_rate(
                handle,
                harmful,
                [],
                interventions,
                matcher=is_refusal,
                judge_handle=judge,
                max_new_tokens=max(args.lengths),
                lengths=args.lengths,
                batch_size=args.batch_size,
            ),
        )
        for name, interventions in edits
    }
    rows = [_row(name, report) for name, report in reports.items()]
    record = {
        "script": "eval_judge",
        "model": args.model,
        "judge": args.judge or args.model,
        "edits": dict(args.edits),
        "rows": rows,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        examples = [
            line
            for name, report in reports.items()
            for line in _disagreements(name, report, args.examples)
        ]
        markdown = _markdown(args, record, rows, examples, command)
        write_section("results.md", args.section, markdown)
    return 0


def _markdown(
    args: argparse.Namespace,
    record: dict[str, Any],
    rows: list[dict[str, Any]],
    examples: list[str],
    command: str,
) -> str:
    columns = list(rows[0])
    edits = ", ".join(f"{name} (`{path}`)" for name, path in args.edits) or "none"
    times = ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items())
    load = record["load_average"]
    return "\n".join(
        [
            "## The refusal matcher beside a judge"
            + ("" if args.section == "judge" else f", {args.section}")
            + " (`scripts/eval_judge.py`)",
            "",
            f"Model `{record['model']}`, judge `{record['judge']}`. "
            + (
                f"A sample of {rows[0]['n']} held-out harmful test prompts (seed {args.seed})"
                if args.sample
                else f"All {rows[0]['n']} held-out harmful test prompts"
            )
            + ", greedy replies "
            f"of {max(args.lengths)} tokens, unedited and with each edit: {edits}. Matcher: "
            "the refusal phrases over each reply's first N tokens. Judge: the whole reply "
            "(steer.directions.evaluate.judge). Agreement and the two disagreement counts "
            f"compare the judge with the matcher over the whole {max(args.lengths)}-token "
            "reply. Rates with Wilson 95% intervals. Nothing is chosen here; the test "
            "prompts were not used to choose the edits.",
            "",
            table(rows, columns),
            "",
            "Disagreements (first of each kind in sample order, replies cut at 240 characters):",
            "",
            *examples,
            "",
            f"Wall times (s): {times}. Measured on {record['machine']}; load average "
            f"{load[0]} before, {load[1]} after.",
            "",
            *command_block(command),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
