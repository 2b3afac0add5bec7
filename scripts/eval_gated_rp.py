"""A gated moralizing edit in RP scenes without a trigger (--triggers: with one); docs/results.md.

Sections "gated-rp" and, with --triggers, "gated-rp-triggers".

Plays the project's RP scenarios (--scenarios; recipes/data/rp_scenarios_unseen.jsonl is a check
set written after the gates were built) that carry none of the --skip-tags (chosen by tag before any
run: no crime, villain, horror or dark-comedy scene; with --triggers only the scenes that carry
one) with the same seeds: unedited, always on (the first gated recipe's edits without their
gate, or --direction ablated at each layer's residual), and each --gated recipe written by
scripts/eval_gated.py. For each it reports the RP metrics of ``steer eval rp``
with 95% bootstrap intervals over scenarios, and how many replies differ from the unedited ones
(a gate that does not fire changes nothing, so an unchanged reply is one the gate left alone or
one the edit did not move).

    python scripts/eval_gated_rp.py --gated out/gated-moralizing/gated.toml
    python scripts/eval_gated_rp.py --gated assistant=A/gated.toml --gated rp-aware=B/gated.toml
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, run_facts, run_footer, table, write_section

from steer.artifacts import load_vector
from steer.cli.eval_refusal import recipe_interventions
from steer.directions.api import interventions_for
from steer.models import load_model
from steer.recipes import load_edit_recipe
from steer.rp.evaluate import SLOP_PHRASES, EvalSettings, load_scenarios, play
from steer.rp.metrics import Transcript, load_phrases, rp_metrics
from steer.rp.presets import load_preset

ROOT = Path(__file__).resolve().parent.parent

#: distinct-n falls when a resample repeats a scenario (its replies count twice), so a bootstrap
#: over scenarios would put its interval below the value: it is shown without one
UNRESAMPLED = ("distinct_2",)
METRICS = (
    "words_per_reply",
    "repetition_in_reply",
    "repetition_across_turns",
    "slop_rate",
    "distinct_2",
    "moralizing_rate",
    "impersonation_rate",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument(
        "--direction",
        help="always on: this direction ablated at each layer's residual (default: the gated "
        "recipe's edits without their gate)",
    )
    parser.add_argument(
        "--gated",
        required=True,
        action="append",
        type=_named,
        help="a gated recipe (eval_gated.py), as PATH or NAME=PATH (row 'gated (NAME)'); "
        "repeat to compare gates on the same edit (always on: the first one's, ungated)",
    )
    parser.add_argument(
        "--scenarios",
        default="recipes/data/rp_scenarios.jsonl",
        help="the scenario file (JSONL as steer eval rp reads; e.g. the check set "
        "recipes/data/rp_scenarios_unseen.jsonl)",
    )
    parser.add_argument("--skip-tags", default="crime,villain,horror,dark comedy")
    parser.add_argument(
        "--triggers",
        action="store_true",
        help="play only the scenes WITH one of --skip-tags (docs section gated-rp-triggers)",
    )
    parser.add_argument("--preset", default="near-greedy")
    parser.add_argument(
        "--format",
        default="chat_template",
        help="prompt format the scenes are played in (steer.rp.formats; chat_completion: as a "
        "chat-completion request without names, ending at the assistant header)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--section", help="docs/results.md section (default: gated-rp or gated-rp-triggers)"
    )
    return parser


def _named(text: str) -> tuple[str, str]:
    name, _, path = text.rpartition("=")
    return (f"gated ({name})" if name else "gated", path)


def _interval(
    transcripts: Sequence[Transcript], phrases: Sequence[str], resamples: int
) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap interval of each metric, resampling whole scenarios."""
    draw = random.Random(0)
    resampled = [name for name in METRICS if name not in UNRESAMPLED]
    values: dict[str, list[float]] = {name: [] for name in resampled}
    for _ in range(resamples):
        sample = [draw.choice(transcripts) for _ in transcripts]
        metrics = rp_metrics(sample, phrases)
        for name in resampled:
            values[name].append(float(metrics[name]))  # type: ignore[arg-type]
    low, high = int(0.025 * resamples), int(0.975 * resamples) - 1
    return {name: (sorted(v)[low], sorted(v)[high]) for name, v in values.items()}


def _differ(played: Sequence[Transcript], other: Sequence[Transcript]) -> int:
    """How many replies of one run differ from the other run's reply at the same turn."""
    pairs = zip(played, other, strict=True)
    return sum(a != b for x, y in pairs for a, b in zip(x.replies, y.replies, strict=True))


def _always_on(args: argparse.Namespace, handle: Any) -> tuple[Any, ...]:
    if args.direction:
        return tuple(interventions_for(load_vector(args.direction, handle=handle)))
    return recipe_interventions(load_edit_recipe(args.gated[0][1]).ungated(), handle)


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    skipped = {tag.strip() for tag in args.skip_tags.split(",") if tag.strip()}
    scenarios = [
        s
        for s in load_scenarios(ROOT / args.scenarios)
        if bool(skipped.intersection(s.tags)) == args.triggers
    ]
    handle = load_model(args.model)
    settings = EvalSettings(
        sampling=replace(load_preset(args.preset), seed=None),
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        format=args.format,
    )
    edits: dict[str, tuple[Any, ...]] = {
        "unedited": (),
        "always on": _always_on(args, handle),
        **{name: recipe_interventions(path, handle) for name, path in args.gated},
    }
    phrases = load_phrases(SLOP_PHRASES)
    rows, seconds = [], {}
    played: dict[str, list[Transcript]] = {}
    for name, interventions in edits.items():
        start = time.perf_counter()
        played[name] = play(handle, scenarios, replace(settings, interventions=interventions))
        seconds[name] = round(time.perf_counter() - start, 1)
        metrics = rp_metrics(played[name], phrases)
        interval = _interval(played[name], phrases, args.resamples)
        row: dict[str, Any] = {"edit": name}
        for metric in METRICS:
            value = f"{float(metrics[metric]):.3g}"  # type: ignore[arg-type]
            if metric in interval:
                low, high = interval[metric]
                value += f" [{low:.3g}, {high:.3g}]"
            row[metric] = value
        count = sum(len(t.replies) for t in played[name])
        row["replies changed"] = f"{_differ(played[name], played['unedited'])} / {count}"
        if name in ("unedited", "always on"):
            row["as always on"] = ""
        else:
            row["as always on"] = f"{count - _differ(played[name], played['always on'])} / {count}"
        rows.append(row)
    record = {
        "model": args.model,
        "scenarios": [s.id for s in scenarios],
        "rows": rows,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, command)
    return 0


def _write_docs(args: argparse.Namespace, record: dict[str, Any], command: str) -> None:
    kind = "with" if args.triggers else "without"
    gated = ", ".join(f"{name} `{path}`" for name, path in args.gated)
    heading = f"Gated moralizing edit in RP {kind} a trigger" + (
        f", {args.section}" if args.section else ""
    )
    markdown = f"""## {heading} (`scripts/eval_gated_rp.py`)

Model `{args.model}`; the scenarios of {args.scenarios} {kind} one of the tags
{args.skip_tags} ({", ".join(record["scenarios"])}), {args.rounds} replies each, at most
{args.max_new_tokens} tokens, preset `{args.preset}`, format `{args.format}`, the same seeds for
every edit. Each metric
(docs/rp.md) with its 95% bootstrap interval over scenarios (distinct_2 without one: a resample
that repeats a scenario repeats its replies, which lowers distinct-n); *replies changed*:
replies whose text differs from the unedited run's; *as always on*: replies identical to the
always-on run's (a gate that fires on every turn of a scene plays it exactly as always on; one
that fires on some turns only plays an edited turn after an unedited one, or the reverse, and its
later replies are new text). Gated recipes: {gated}.

{table(record["rows"], ["edit", *METRICS, "replies changed", "as always on"])}

{run_footer(record, command)}"""
    section = args.section or ("gated-rp-triggers" if args.triggers else "gated-rp")
    write_section("results.md", section, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
