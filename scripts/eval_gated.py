"""A gated edit against the same edit always on, measured honestly; docs/results.md ("gated").

Every choice is made on train and validation, and the test split is measured once, at the end:

1. the direction: computed with the recipe (its layer and position chosen by the search on the
   validation split), or given with --direction;
2. the gate: a prompt-scope condition (CAST) on the direction's projection at the chat prompt's
   last token. For each candidate layer (the direction's own and --gate-layers) its
   threshold is the lowest whose false-positive rate on the *train* harmless prompts is at most
   --target-fpr (:func:`steer.calibration.calibrate_gate`); among the layers, the one with the
   highest validation TPR - FPR is kept (the earliest of equals). Where it fires, the request
   runs as with the edit always on, prompt included (the engine runs the prompt pass again);
3. the edits: the direction ablated at every layer, always on and behind the gate, each at
   weight 1 (nothing tuned);
4. the test split, once: the rate at each reply length (one greedy generation at the longest,
   matcher over each reply's first N tokens) with Wilson 95% intervals, first-token KL and
   multi-token KL over the base model's first --kl-tokens tokens on held-out harmless prompts.

The gated recipe (threshold and calibration figures in it) is written to --out. Prints one JSON
line. A contrast recipe (refusal, custom contrasts) gives the prompts the gate should fire on and
those it should not; a pairs recipe (moralizing) fires on its RP situations and stays quiet on
the harmless instructions of recipes/refusal.toml, each split as every step splits them, and is
scored with the moralizing matcher.

    python scripts/eval_gated.py --model qwen2.5-coder-0.5b-instruct --out out/gated-refusal
    python scripts/eval_gated.py --recipe recipes/moralizing.toml --out out/gated-moralizing
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine, table, write_section

from steer.artifacts import load_vector
from steer.calibration import ContrastPrompts, GateCalibration, calibrate_gate
from steer.cli.eval_refusal import _lengths
from steer.directions import data as datasets
from steer.directions.api import compute, contrast_splits, interventions_for
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import (
    RateReport,
    base_continuations,
    evaluate_rate,
    is_moralizing,
    is_refusal,
)
from steer.directions.recipe import RecipeKind, load_direction_recipe
from steer.gates import Gated, GateScope
from steer.models import load_model
from steer.text import encode_chat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--direction", help="use this artifact instead of computing one")
    parser.add_argument("--out", default="out/gated-refusal")
    parser.add_argument("--lengths", type=_lengths, default=(16, 64))
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument(
        "--gate-layers", default="", help="candidate gate layers besides the direction's own"
    )
    parser.add_argument("--max-test", type=int, default=0, help="cap test prompts (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    return parser


def _timed(seconds: dict[str, float], name: str, work: Any) -> Any:
    start = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def _choose_gate(
    handle: Any, vector: Any, layers: Sequence[int], splits: dict[str, Any], target_fpr: float
) -> tuple[GateCalibration, list[dict[str, Any]]]:
    """Calibrate a gate at each layer on train; keep the best validation TPR - FPR."""
    train = ContrastPrompts(splits["positive"].train, splits["negative"].train)
    validation = ContrastPrompts(splits["positive"].validation, splits["negative"].validation)
    tried = []
    for layer in layers:
        calibration = calibrate_gate(
            handle,
            f"blocks.{layer}.hook_resid_pre",
            vector,
            train=train,
            validation=validation,
            target_fpr=target_fpr,
        )
        tried.append(calibration)

    def youden(c: GateCalibration) -> float:
        return c.validation.true_positive_rate - c.validation.false_positive_rate

    top = max(youden(c) for c in tried)
    best = next(c for _, c in sorted(zip(layers, tried, strict=True)) if youden(c) == top)
    rows = [
        {
            "gate hook": c.hook,
            "threshold": c.threshold,
            "train TPR": c.train.true_positive_rate,
            "train FPR": c.train.false_positive_rate,
            "validation TPR": c.validation.true_positive_rate,
            "validation FPR": c.validation.false_positive_rate,
            "kept": "yes" if c is best else "",
        }
        for c in tried
    ]
    return best, rows


def _splits(recipe: Any) -> dict[str, Any]:
    """{"positive": Splits, "negative": Splits} of the prompts a gate fires / stays quiet on."""
    if recipe.kind is not RecipeKind.PAIRS:
        return contrast_splits(recipe)
    data = recipe.data
    situations = [pair.prompt for pair in datasets.recipe_pairs(recipe)]
    harmless = contrast_splits(load_direction_recipe(RECIPES_DIR / "refusal.toml"))["negative"]
    positive = datasets.split(
        situations, seed=data.seed, train=data.train, validation=data.validation
    )
    return {"positive": positive, "negative": harmless}


def _gated_recipe(direction: Path, calibration: GateCalibration) -> str:
    v = calibration.validation
    return (
        f"# The direction ablated at every layer, only for prompts the gate fires on.\n"
        f"# Threshold chosen on the train split (FPR <= {calibration.target_fpr} on harmless);\n"
        f"# validation: TPR {v.true_positive_rate:.3f} on {v.fire_count} harmful, "
        f"FPR {v.false_positive_rate:.3f} on {v.quiet_count} harmless (scripts/eval_gated.py).\n"
        f'name = "gated-ablation"\n\n[[edits]]\nkind = "ablate"\n'
        f'direction = "{direction.resolve()}"\nweight = 1.0\n\n[edits.gate]\n'
        f'hook = "{calibration.hook}"\ndirection = "{direction.resolve()}"\n'
        f'threshold = {calibration.threshold!r}\nscope = "prompt"\n'
    )


def _row(name: str, report: RateReport, n_kl: int) -> dict[str, Any]:
    row: dict[str, Any] = {"edit": name}
    for entry in report.by_length:
        row[f"rate @{entry.tokens}"] = f"{entry.rate:.3f} [{entry.low:.3f}, {entry.high:.3f}]"
    row["first-token KL"] = report.kl_first_token
    row["multi-token KL"] = report.kl_multi_token
    row["n"] = f"{report.n} / {n_kl}"
    return row


def main() -> int:
    args = _parser().parse_args()
    command = "python scripts/eval_gated.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    recipe = load_direction_recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = _timed(seconds, "load_model", lambda: load_model(args.model))
    directory = Path(args.direction) if args.direction else None
    if directory is None:
        directory = _timed(
            seconds,
            "compute_direction",
            lambda: compute(
                handle,
                recipe,
                out / "direction",
                progress=lambda *_: None,
                cancelled=threading.Event(),
            ),
        )
    artifact = load_vector(directory, handle=handle)
    layer = int(artifact.metadata.get("layer") or artifact.vector.layers[0])
    layers = sorted({layer, *(int(x) for x in args.gate_layers.split(",") if x.strip())})
    splits = _splits(recipe)
    matcher = is_moralizing if recipe.kind is RecipeKind.PAIRS else is_refusal
    calibration, calibration_rows = _timed(
        seconds,
        "calibrate_gate",
        lambda: _choose_gate(handle, artifact.vector, layers, splits, args.target_fpr),
    )
    (out / "gated.toml").write_text(_gated_recipe(directory, calibration))
    always = interventions_for(artifact)
    condition = calibration.condition(artifact.vector)
    gated = tuple(Gated(condition=condition, inner=op, scope=GateScope.PROMPT) for op in always)

    # the test split, once
    harmful = list(splits["positive"].test)
    harmless = list(splits["negative"].test)
    if args.max_test:
        harmful, harmless = harmful[: args.max_test], harmless[: args.max_test]
    harmless_ids = [encode_chat(handle, prompt) for prompt in harmless]
    continuations = _timed(
        seconds,
        "base_continuations",
        lambda: base_continuations(
            handle, harmless_ids, tokens=args.kl_tokens, batch_size=args.batch_size
        ),
    )
    options: dict[str, Any] = {
        "matcher": matcher,
        "max_new_tokens": max(args.lengths),
        "lengths": args.lengths,
        "kl_tokens": args.kl_tokens,
        "batch_size": args.batch_size,
        "continuations": continuations,
    }
    reports = {
        name: _timed(
            seconds,
            f"evaluate_{name}",
            lambda edits=edits: evaluate_rate(handle, harmful, harmless, edits, **options),
        )
        for name, edits in (("unedited", ()), ("always on", always), ("gated", gated))
    }
    load_after = os.getloadavg()[0]
    rows = [_row(name, report, len(harmless)) for name, report in reports.items()]
    record = {
        "kind": "moralizing" if recipe.kind is RecipeKind.PAIRS else "refusal",
        "model": args.model,
        "direction": str(directory),
        "gate": calibration_rows,
        "test": rows,
        "seconds": seconds,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "machine": machine(),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, rows, calibration_rows, command)
    return 0


def _write_docs(
    args: argparse.Namespace,
    record: dict[str, Any],
    rows: list[dict[str, Any]],
    calibration_rows: list[dict[str, Any]],
    command: str,
) -> None:
    lengths = [f"rate @{n}" for n in args.lengths]
    columns = ["edit", *lengths, "first-token KL", "multi-token KL", "n"]
    kind = record["kind"]
    rated = (
        "moralizing rate on the held-out RP situations (recipes/data/moralizing_pairs.jsonl)"
        if kind == "moralizing"
        else "refusal rate on the held-out test split of the recipe's harmful prompts"
    )
    markdown = f"""## Gated {kind} ablation (`scripts/eval_gated.py`)

Model `{args.model}`, direction `{record["direction"]}`. Every choice on train / validation; the
test split measured once, after them: {rated}, with
the phrase matcher over each greedy reply's first N tokens (Wilson 95% intervals); first-token
and multi-token KL (over the base model's first {args.kl_tokens} greedy tokens) on the held-out
harmless test split. The direction is ablated at every layer at weight 1 (not tuned), always on
or behind a prompt-scope gate.

Gate calibration (threshold: lowest with train FPR <= {args.target_fpr}; layer: the best
validation TPR - FPR; no test prompt read). Where the gate fires, the request runs as with the
ablation always on, prompt included:

{table(calibration_rows, list(calibration_rows[0]))}

Test split, measured once:

{table(rows, columns)}

Wall times (s): {", ".join(f"{k} {v}" for k, v in record["seconds"].items())}. Measured on
{record["machine"]}; load average {record["load_average"][0]} before, {record["load_average"][1]}
after.

Command:

```
{command}
```
"""
    write_section("results.md", "gated" if kind == "refusal" else f"gated-{kind}", markdown)


if __name__ == "__main__":
    raise SystemExit(main())
