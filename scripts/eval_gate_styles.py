"""A prompt-scope gate on prompts in a style it was not fitted on; docs/results.md ("gate-styles").

The gate's validation figures (what ``steer directions gate`` and ``scripts/eval_gated.py``
report and choose by) come from prompts of the same sets as its train prompts. This script
estimates what the gate does on requests written another way, from train and validation prompts
only (:func:`steer.directions.gate_styles.held_out_styles`): each style is held out in turn,
the gate fitted and calibrated on the others exactly as the product does, its rates read on the
held-out one, then pooled. Two kinds of style:

* *source*: the recipe's own sets (for refusal: StrongREJECT and harmless.jsonl) against its
  ``data.positive_extra`` / ``negative_extra`` (harmful_varied.txt / harmless_varied.txt);
* *phrasing*: the extras' blocks of ``--block`` lines, one phrasing each, matched line by line in
  the two files (twelve blocks of 20 in the refusal data); the recipe's own sets stay in every fit.

With several extra sets per side (``recipes/refusal-gate.toml``), the i-th set of each side is
one source; ``--styles source`` skips the phrasing blocks (sets written interleaved have none).
``--curve`` adds the new-source rates of a gate fitted on only k of the other sources, for every
k: whether a gate fitted on more sources keeps its rates better on one it has not seen.

For each condition, hook and train false-positive target: the same-style validation rates, then
both held-out estimates. With ``--mean-last 1,5``, also for a gate reading the mean of the
prompt's last 5 tokens (the chat template's post-instruction tokens) instead of the last one:
an estimate only, no gate in steer reads that. No test or check prompt is read. Prints one
JSON line.

    python scripts/eval_gate_styles.py --direction out/gated-refusal/direction
    python scripts/eval_gate_styles.py --direction out/gated-refusal/direction \\
        --recipe recipes/refusal-gate.toml --styles source --curve --section gate-sources
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, run_facts, run_footer, table, timed, write_section

from steer.activations import forward
from steer.artifacts import load_vector
from steer.calibration import CONDITIONS, ContrastPrompts, PromptReads
from steer.directions import data as datasets
from steer.directions.data import RECIPES_DIR
from steer.directions.gate_styles import KEYS, held_out_styles, source_labels
from steer.directions.gating import gate_prompts, gate_splits
from steer.directions.recipe import DirectionRecipe, load_direction_recipe
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle, load_model
from steer.text import encode_chat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--direction", required=True, help="the edit's direction artifact")
    parser.add_argument("--gate-layers", default="8,12,16,18")
    parser.add_argument("--targets", default="0.02,0.1", help="train false-positive targets")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--block", type=int, default=20, help="lines per phrasing in the extras")
    parser.add_argument(
        "--mean-last",
        default="1",
        help="comma-separated K: rows for a gate reading the mean of the prompt's last K tokens "
        "(1: the last token, what a prompt-scope gate reads)",
    )
    parser.add_argument(
        "--styles",
        default="source,phrasing",
        help="which styles to hold out: source, phrasing or both (phrasing needs extras written "
        "in blocks of --block lines)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also the new-source rates of a gate fitted on k of the other sources, every k",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    parser.add_argument("--section", default="gate-styles", help="docs/results.md section")
    return parser


def phrasing_labels(recipe: DirectionRecipe, block: int) -> dict[str, str]:
    """{prompt: its phrasing} for the recipe's extras: block ``i`` of ``block`` lines of the
    k-th set of each side is phrasing i + 1 (of set k, where a side lists several; the prompts
    of the recipe's own sets are absent)."""
    phrasing: dict[str, str] = {}
    for name in ("positive_extra", "negative_extra"):
        sets = datasets.extra_sets(recipe, name)
        for number, prompts in enumerate(sets, start=1):
            prefix = f"set {number} " if len(sets) > 1 else ""
            for index, prompt in enumerate(prompts):
                phrasing[prompt] = f"{prefix}phrasing {index // block + 1}"
    return phrasing


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    recipe = load_direction_recipe(args.recipe)
    splits = gate_splits(recipe)
    parts = {part: gate_prompts(splits, part) for part in ("train", "validation")}
    by_source = source_labels(recipe, parts)
    if by_source is None:
        raise SystemExit(
            f"{args.recipe}: styles come from data.positive_extra / negative_extra, or "
            "data.gate_fire / gate_quiet"
        )
    phrasings = phrasing_labels(recipe, args.block)
    by_phrasing = {
        f"{part}.{side}": [phrasings.get(str(p), "") for p in getattr(split, side)]
        for part, split in parts.items()
        for side in ("fire", "quiet")
    }
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    direction = load_vector(args.direction, handle=handle).vector
    hooks = [f"blocks.{int(x)}.hook_resid_pre" for x in args.gate_layers.split(",") if x.strip()]
    spans = sorted({int(x) for x in args.mean_last.split(",") if x.strip()})
    by_span = timed(
        seconds,
        "read_prompts",
        lambda: read_spans(handle, hooks, parts, spans, recipe.data.system, args.batch_size),
    )
    styles = {"source": by_source, "phrasing": by_phrasing}
    kinds = [k.strip() for k in args.styles.split(",") if k.strip()]
    if not kinds or set(kinds) - set(styles):
        raise SystemExit(f"--styles: give source, phrasing or both, not {args.styles!r}")
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    for span, reads in by_span.items():
        for condition in (c.strip() for c in args.conditions.split(",") if c.strip()):
            _, scores = reads.gate(condition, direction)
            for target in (float(x) for x in args.targets.split(",")):
                held = {
                    kind: held_out_styles(
                        reads, styles[kind], condition, direction, target_fpr=target
                    )
                    for kind in kinds
                }
                for index, score in enumerate(scores):
                    same = score.calibrate(target).validation
                    by_kind = {kind: rates[index] for kind, rates in held.items()}
                    rows.append(_row(span, condition, target, same, by_kind))
                if args.curve:
                    points = source_curve(reads, by_source, condition, direction, target)
                    curve += [_curve_row(span, condition, target, *point) for point in points]
    record = {
        "model": args.model,
        "recipe": args.recipe,
        "direction": args.direction,
        "rows": rows,
        "curve": curve,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, command)
    return 0


def read_spans(
    handle: ModelHandle,
    hooks: list[str],
    parts: dict[str, ContrastPrompts],
    spans: list[int],
    system: str,
    batch_size: int,
) -> dict[int, PromptReads]:
    """{K: the reads of every prompt at ``hooks``, each the mean of its last K tokens}, from one
    pass (K = 1: what :func:`steer.calibration.read_prompts` reads)."""
    points = tuple(handle.resolver.parse(hook) for hook in hooks)
    last = list(range(-max(spans), 0))
    read: dict[str, dict[str, Any]] = {}
    for part, split in parts.items():
        for side in ("fire", "quiet"):
            ids = [encode_chat(handle, str(p), system or None) for p in getattr(split, side)]
            result = forward(handle, ids, hooks=hooks, positions=last, batch_size=batch_size)
            read[f"{part}.{side}"] = result.activations
    return {
        span: PromptReads(
            points,
            {
                key: {h: rows[:, -span:].float().mean(1) for h, rows in by_hook.items()}
                for key, by_hook in read.items()
            },
        )
        for span in spans
    }


def source_curve(
    reads: PromptReads,
    labels: dict[str, list[str]],
    condition: str,
    direction: Any,
    target: float,
) -> list[tuple[str | tuple[str, ...], int, float, float, int]]:
    """(hook, k, mean TPR, mean FPR, folds) for a gate fitted on k of the other sources, read
    on a held-out one: every held-out source with every k of the others (prompts labelled ""
    in every fit), the rates averaged over those folds."""
    sources = [s for s in dict.fromkeys(x for key in KEYS for x in labels[key]) if s]
    folds: dict[tuple[int, int], list[tuple[float, float]]] = {}
    hooks: list[str | tuple[str, ...]] = []
    for size in range(2, len(sources) + 1):
        for subset in combinations(sources, size):
            keep = {key: [x == "" or x in subset for x in labels[key]] for key in KEYS}
            masks = {key: torch.tensor(mask) for key, mask in keep.items()}
            fewer = PromptReads(
                reads.points,
                {key: {h: rows[masks[key]] for h, rows in reads.read[key].items()} for key in KEYS},
            )
            kept = {
                key: [x for x, k in zip(labels[key], keep[key], strict=True) if k] for key in KEYS
            }
            try:
                rates = held_out_styles(fewer, kept, condition, direction, target_fpr=target)
            except InvalidArgumentError:  # fewer than two sources with prompts on both sides
                continue
            hooks = [one.hook for one in rates]
            for index, one in enumerate(rates):
                folds.setdefault((index, size - 1), []).extend(one.by_style.values())
    return [
        (
            hooks[index],
            k,
            sum(t for t, _ in pairs) / len(pairs),
            sum(f for _, f in pairs) / len(pairs),
            len(pairs),
        )
        for (index, k), pairs in sorted(folds.items())
    ]


def _row(
    span: int, condition: str, target: float, same: Any, held: dict[str, Any]
) -> dict[str, Any]:
    row = {
        "reads": "last token" if span == 1 else f"mean of last {span}",
        "condition": condition,
        "gate hook": next(iter(held.values())).hook,
        "train FPR target": target,
        "same-style TPR": round(same.true_positive_rate, 3),
        "same-style FPR": round(same.false_positive_rate, 3),
    }
    for kind, rates in held.items():
        row[f"new {kind} TPR"] = round(rates.true_positive_rate, 3)
        row[f"new {kind} FPR"] = round(rates.false_positive_rate, 3)
    if "source" in held:
        row["by source (TPR, FPR)"] = "; ".join(
            f"{name} {tpr:.2f}, {fpr:.2f}" for name, (tpr, fpr) in held["source"].by_style.items()
        )
    return row


def _curve_row(
    span: int,
    condition: str,
    target: float,
    hook: str | tuple[str, ...],
    k: int,
    tpr: float,
    fpr: float,
    folds: int,
) -> dict[str, Any]:
    return {
        "reads": "last token" if span == 1 else f"mean of last {span}",
        "condition": condition,
        "gate hook": hook,
        "train FPR target": target,
        "sources fitted": k,
        "new source TPR (mean)": round(tpr, 3),
        "new source FPR (mean)": round(fpr, 3),
        "folds": folds,
    }


def _write_docs(args: argparse.Namespace, record: dict[str, Any], command: str) -> None:
    title = "A gate on prompts in a style it was not fitted on"
    phrasing = (
        f"\n*New phrasing*: the same with each of the extras' phrasings (blocks of {args.block}"
        " lines) held out in turn, the recipe's own sets always fitted."
        if "phrasing" in args.styles
        else ""
    )
    curve = (
        "\nThe same gate fitted on k of the other sources only, every held-out source with every"
        " k of the others, the rates averaged over those folds (*sources fitted* = k): does a"
        " gate keep its rates on a new source better when it has seen more sources?\n\n"
        + table(record["curve"], list(record["curve"][0]))
        + "\n"
        if record["curve"]
        else ""
    )
    markdown = f"""## {title} (`scripts/eval_gate_styles.py`)

Model `{args.model}`, recipe `{args.recipe}`, direction `{args.direction}`; train and validation
prompts only. *Reads*: the residual at the prompt's last token (what a prompt-scope gate reads),
or the mean over its last K tokens (an estimate only: no gate in steer reads that).
*Same-style*: the gate calibrated on train at the target, its rates on validation (what the
gate reports and is chosen by). *New source*: fitted and calibrated on all the train and
validation prompts but one source's (the recipe's own sets; its extras, or with several extra
sets per side the i-th set of each side), rates on the held-out source, pooled over every
source held out in turn (by source: the rates on each source when it was the held-out
one).{phrasing}
A threshold that keeps its false-positive rate only on prompts written like its train prompts
shows here as a new-style FPR far above the target.

{table(record["rows"], list(record["rows"][0]))}
{curve}
{run_footer(record, command)}"""
    write_section("results.md", args.section, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
