"""Which reply-gate window separates refused or moralizing replies; docs/results.md ("reply-window")

A reply-scope gate (docs/service.md) reads a direction's projection at the positions that draw
the model's first K reply tokens and fires if any of them passes its threshold ("any") or if
their mean does ("mean"). Which K and which aggregate catch refusals best at a given false-positive
rate is a question for train prompts only. This script takes up to ``--count`` prompts the
recipe's gate should fire on and as many it should stay quiet on, from the train split (seeded;
:func:`steer.directions.gating.gate_prompts`), labels each of the first by whether the unedited
model's reply matches (``--matcher``: refusal or moralizing, on ``--label-tokens`` greedy tokens),
reads the window the
engine reads (:func:`steer.passes.reply_windows`, ``--window`` positions) at each hook, and
reports, for each aggregate and each K up to the window, the AUC of matched against quiet
prompts and the share of matched prompts a threshold set by a harmless false-positive rate
catches (the threshold as :meth:`steer.calibration.GateScores.calibrate` sets it). No
validation, test or check prompt is read. Prints one JSON line.

    python scripts/eval_reply_window.py --direction out/refusal/direction \\
        --recipe recipes/refusal-gate.toml --section reply-window
    python scripts/eval_reply_window.py --direction out/moralizing/direction \\
        --recipe recipes/moralizing.toml --matcher moralizing --gate-layers 6,8,12,18 \\
        --window 16 --section reply-window-moralizing
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, run_facts, run_footer, table, timed, write_section

from steer.artifacts import load_vector
from steer.calibration import GateScores
from steer.directions.evaluate import MATCHERS
from steer.directions.gating import gate_prompts, gate_splits
from steer.directions.recipe import load_direction_recipe
from steer.directions.steering import greedy
from steer.discriminant import auc
from steer.models import load_model
from steer.passes import reply_windows
from steer.text import encode_chat

#: per matcher: what the unedited model does to the fire prompts, and the two sides' names
LABELS = {
    "refusal": ("refuses", ("harmful", "harmless")),
    "moralizing": ("moralizes on", ("trigger", "quiet")),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default="recipes/refusal-gate.toml")
    parser.add_argument("--direction", required=True, help="the condition's direction artifact")
    parser.add_argument("--gate-layers", default="12,16,18,20")
    parser.add_argument("--matcher", choices=sorted(MATCHERS), default="refusal")
    parser.add_argument("--count", type=int, default=200, help="train prompts per side (at most)")
    parser.add_argument("--window", type=int, default=8, help="positions read (the largest K)")
    parser.add_argument("--label-tokens", type=int, default=48)
    parser.add_argument("--targets", default="0.01,0.02,0.05", help="harmless FPR targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--section", default="reply-window")
    parser.add_argument("--no-docs", action="store_true")
    return parser


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    recipe = load_direction_recipe(args.recipe)
    train = gate_prompts(gate_splits(recipe), "train")
    rng = random.Random(args.seed)
    fire = rng.sample(list(train.fire), min(args.count, len(train.fire)))
    quiet = rng.sample(list(train.quiet), min(args.count, len(train.quiet)))
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    direction = load_vector(args.direction, handle=handle).vector
    system = recipe.data.system or None
    ids = {
        side: [encode_chat(handle, str(p), system) for p in prompts]
        for side, prompts in (("fire", fire), ("quiet", quiet))
    }
    replies = timed(seconds, "label", lambda: greedy(handle, [(ids["fire"], args.label_tokens)])[0])
    matches = MATCHERS[args.matcher]
    matched = [matches(handle.tokenizer.decode(r, skip_special_tokens=True)) for r in replies]
    hooks = [f"blocks.{int(x)}.hook_resid_pre" for x in args.gate_layers.split(",") if x.strip()]
    windows = timed(
        seconds,
        "read_windows",
        lambda: {
            side: reply_windows(handle, rows, hooks, args.window, args.batch_size)
            for side, rows in ids.items()
        },
    )
    targets = [float(x) for x in args.targets.split(",") if x.strip()]
    rows = []
    for hook in hooks:
        layer = int(hook.split(".")[1])
        unit = direction.at(layer).float()
        unit = unit / unit.norm()
        projected = {side: windows[side][hook].float() @ unit for side in windows}
        fire_matched = projected["fire"][torch.tensor(matched, dtype=torch.bool)]
        rows += _rows(hook, fire_matched, projected["quiet"], targets, args.window)
    record = {
        "model": args.model,
        "recipe": args.recipe,
        "direction": args.direction,
        "matcher": args.matcher,
        "count": [len(fire), len(quiet)],
        "matched": sum(matched),
        "rows": rows,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, targets, command)
    return 0


def _rows(
    hook: str, fire: torch.Tensor, quiet: torch.Tensor, targets: list[float], window: int
) -> list[dict[str, Any]]:
    """One row per aggregate and K (1, 2, 4, ... up to ``window``): (prompts, window)
    projections of matched (``fire``) and quiet (``quiet``) prompts."""
    rows = []
    sizes = sorted({k for k in (1, 2, 4, 6, 8, 16, 32, 64) if k < window} | {window})
    for aggregate in ("any", "mean"):
        for k in sizes:
            reduce = (lambda x: x.mean(-1)) if aggregate == "mean" else (lambda x: x.amax(-1))
            scores = {"f": reduce(fire[:, :k]).tolist(), "q": reduce(quiet[:, :k]).tolist()}
            read = {"train.fire": scores["f"], "train.quiet": scores["q"]}
            validation = {"validation.fire": scores["f"], "validation.quiet": scores["q"]}
            gate = GateScores(hook, False, read | validation)  # only train's threshold is used
            row: dict[str, Any] = {"hook": hook, "aggregate": aggregate, "K": k}
            row["AUC"] = auc(torch.tensor(scores["f"]), torch.tensor(scores["q"]))
            for target in targets:
                threshold = gate.calibrate(target).threshold
                caught = sum(gate.fires("train.fire", threshold)) / len(scores["f"])
                row[f"caught @ FPR {target:g}"] = caught
            rows.append(row)
    return rows


def _write_docs(
    args: argparse.Namespace, record: dict[str, Any], targets: list[float], command: str
) -> None:
    columns = ["hook", "aggregate", "K", "AUC", *(f"caught @ FPR {t:g}" for t in targets)]
    fire, quiet = record["count"]
    label, sides = LABELS[record["matcher"]]
    lines = [
        f"## A reply gate's window on train prompts, {args.section} "
        "(`scripts/eval_reply_window.py`)",
        "",
        f"Model `{record['model']}`; {fire} {sides[0]} and {quiet} {sides[1]} prompts from the "
        f"train split of `{record['recipe']}` (seed {args.seed}); the unedited model {label} "
        f"{record['matched']} of the {sides[0]} ones ({record['matcher']} matcher, "
        f"{args.label_tokens} greedy tokens). Condition: `{record['direction']}`. Each row: a "
        "reply gate reading the first K positions of the window (any: the largest projection; "
        f"mean: their mean); AUC of those {record['matched']} against the {sides[1]} prompts; "
        f"*caught*: the share of them over the threshold a {sides[1]} false-positive rate sets "
        "on these same prompts (an in-sample estimate, to compare windows, not a gate's rates). "
        "Train prompts only.",
        "",
        table(record["rows"], columns),
        "",
        run_footer(record, command),
    ]
    write_section("results.md", args.section, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
