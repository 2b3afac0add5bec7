"""A gated edit against the same edit always on, measured honestly; docs/results.md ("gated").

Every choice is made on train and validation, and the test split is measured once, at the end:

1. the direction: computed with the recipe (its layer and position chosen by the search on the
   validation split), or given with --direction;
2. the gate: a prompt-scope condition (CAST) on a projection at the chat prompt's last token
   (onto the direction itself, CAST's contrast condition vector, or Fisher's discriminant; see
   --conditions), at one of the candidate layers (the direction's own and --gate-layers; every
   prompt read once). Candidate thresholds come from train: for each target in --fpr-grid,
   the lowest whose false-positive rate on the *train* harmless prompts is at most it
   (:meth:`steer.calibration.GateScores.calibrate`). The validation split chooses among them
   by outcome: it is evaluated unedited and with the edit always on at each of --weights (and
   --pushes: the direction also subtracted at its hook), and since a request whose gate fires
   runs exactly as always on and any other as unedited, every candidate's (weight, push, hook,
   threshold) validation rate and KL follow from those runs
   (:func:`gated_report`). Kept: the lowest validation first-token KL among candidates whose
   validation rate at the longest length is at most --max-rate (default: the lowest always-on
   rate there); or, with --max-kl, the lowest validation rate among candidates whose
   validation first-token KL is at most it, ties to the higher validation TPR (a rate of a
   few dozen prompts ties often; the gate that catches more of them generalises better) or,
   with --ties fpr, to the lower validation FPR (the share of quiet prompts a gate fires on
   sets what it costs on new ones; a validation KL of zero says only that no fire landed on
   a prompt the KL reads);
3. the edits: the direction ablated at every layer at the kept weight (pushed against at the
   kept push), always on and behind the gate;
4. the test split, once: the rate at each reply length (one greedy generation at the longest,
   matcher over each reply's first N tokens) with Wilson 95% intervals, first-token KL and
   multi-token KL over the base model's first --kl-tokens tokens on held-out harmless prompts.

The gated recipe (threshold and calibration figures in it) is written to --out; with the recipe's
data.positive_extra / negative_extra, the kept gate's rates on a source of prompts it was not
fitted on (:func:`steer.directions.gate_styles.new_source_rates`) join its figures there and in the
docs. Prints one JSON line. A contrast recipe (refusal, custom contrasts) gives the prompts the
gate should fire on and those it should not (its data.positive_extra / negative_extra join train
and validation only); a pairs recipe (moralizing) fires on its RP situations and stays quiet on the
harmless instructions of recipes/refusal.toml (not its extras), each split as every step splits
them, and is scored with the moralizing matcher. A recipe's data.gate_fire prompts (moralizing:
more villain situations, no replies) join the fire side of the calibration and of the validation
TPR (the rates are read on the positive set's replies). A recipe's data.gate_quiet prompts
(moralizing: RP situations without a trigger) join the quiet side: of the calibration, of the
validation KL the choice reads, and of the test, where their KL is reported apart. A recipe's
data.gate_harmless prompts (moralizing: more ordinary requests) join the harmless ones in every
split. With the recipe's data.gate_scenes (moralizing), the gate is also calibrated on the
situations of both sides played as RP scenes, in each of steer.directions.scene_forms.SCENE_FORMS
(ending in the character's name; chat-completion messages ending at the assistant header); the
validation choice reads the one-message runs, and the validation TPR / FPR columns count the scenes
too. A recipe's data.gate_scenarios scenes (steer.directions.gate_scenarios), played unedited, join
the calibration and those columns the same way, after the rendered situations.

    python scripts/eval_gated.py --model qwen2.5-coder-0.5b-instruct --out out/gated-refusal
    python scripts/eval_gated.py --recipe recipes/moralizing.toml --out out/gated-moralizing
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from report import (
    command_line,
    emit,
    rate_evaluator,
    rate_row,
    reply_repetition,
    run_facts,
    run_footer,
    table,
    timed,
    write_section,
)

from steer.activations import forward
from steer.artifacts import load_vector
from steer.calibration import (
    CONDITIONS,
    GateCalibration,
    GateScores,
    PromptReads,
    summed_scores,
)
from steer.cli.eval_refusal import _lengths, recipe_interventions
from steer.directions.api import compute
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import (
    RateReport,
    gated_report,
    is_moralizing,
    is_refusal,
)
from steer.directions.gate_recipe import ablation_recipe, gated_ablation_recipe
from steer.directions.gate_styles import StyleRates, new_source_rates
from steer.directions.gating import gate_reads, gate_splits, quiet_prompts
from steer.directions.recipe import DataSection, RecipeKind, load_direction_recipe
from steer.directions.scene_forms import SCENE_FORMS, scene_prompt
from steer.gates import GateScope
from steer.models import load_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--direction", help="use this artifact instead of computing one")
    parser.add_argument(
        "--also",
        type=lambda text: tuple(Path(x.strip()) for x in text.split(",") if x.strip()),
        default=(),
        help="more direction artifacts ablated with the direction, at the same weight and "
        "behind the same gate (comma-separated; the gate reads the direction's condition)",
    )
    parser.add_argument("--out", default="out/gated-refusal")
    parser.add_argument("--lengths", type=_lengths, default=(16, 64))
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument(
        "--fpr-grid",
        type=_rates,
        default=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
        help="train false-positive rates that give the candidate thresholds",
    )
    parser.add_argument(
        "--conditions",
        type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
        default=CONDITIONS,
        help="what a gate reads: the edit's direction; a contrast condition vector (train fire "
        "minus quiet prompts' last-token means, CAST); a discriminant one (that difference "
        "whitened by the within-class covariance, Fisher's)",
    )
    parser.add_argument(
        "--weights",
        type=_rates,
        default=(1.0,),
        help="ablation weights to choose from on validation (each costs a validation run)",
    )
    parser.add_argument(
        "--pushes",
        type=_rates,
        default=(0.0,),
        help="push strengths to choose from on validation, with each weight: the direction also "
        "subtracted at its own hook at this strength, behind the same gate (0 = ablation only; "
        "each costs a validation run)",
    )
    parser.add_argument(
        "--max-rate",
        type=float,
        default=None,
        help="the highest validation rate a kept gate may have (default: the lowest always-on "
        "rate of --weights)",
    )
    parser.add_argument(
        "--max-kl",
        type=float,
        default=None,
        help="keep the lowest validation rate among candidates with a validation first-token "
        "KL of at most this (ties: see --ties) instead of the --max-rate rule",
    )
    parser.add_argument(
        "--ties",
        choices=("tpr", "fpr"),
        default="tpr",
        help="with --max-kl, equal validation rates go to the higher validation TPR (tpr), or "
        "to the lower validation FPR, then the higher TPR (fpr); then the lower KL",
    )
    parser.add_argument(
        "--gate-layers", default="", help="candidate gate layers besides the direction's own"
    )
    parser.add_argument(
        "--summed",
        action="store_true",
        help="one more candidate hook per condition: the sum over all the candidate gate "
        "layers, each layer's projection divided by its spread over the quiet train prompts "
        "(steer.calibration.summed_scores; a gate reading several hooks)",
    )
    parser.add_argument("--max-test", type=int, default=0, help="cap test prompts (0 = all)")
    parser.add_argument(
        "--max-validation",
        type=int,
        default=0,
        help="cap the validation prompts evaluated for the gate choice (0 = all; smoke runs)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    parser.add_argument("--section", help="docs/results.md section (default: gated, or gated-KIND)")
    parser.add_argument(
        "--no-gate-quiet",
        action="store_true",
        help="calibrate the gate against the negative prompts only (leave out the recipe's "
        "data.gate_quiet)",
    )
    parser.add_argument(
        "--no-gate-scenes",
        action="store_true",
        help="calibrate on one-message prompts only (leave out the recipe's data.gate_scenes)",
    )
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="stop after the gate choice: print the validation figures and write the gated "
        "recipe, read no test prompt (to compare configurations without spending the test split)",
    )
    return parser


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


@dataclass(frozen=True)
class Candidate:
    """A gated edit: the ablation's weight and push, and a gate (hook, threshold from train),
    with the validation report it would give."""

    weight: float
    push: float
    condition: str  # "direction" (the edit's own), "contrast" (CAST's) or "discriminant"
    vector: Any  # the condition's SteeringVector
    calibration: GateCalibration
    report: RateReport


def _candidates(
    conditions: dict[str, tuple[Any, list[GateScores]]],
    fpr_grid: Sequence[float],
    unedited: RateReport,
    always: dict[tuple[float, float], RateReport],
) -> list[Candidate]:
    """Each candidate (weight, push, condition, hook, threshold) with its validation report."""
    candidates = []
    pairs = [(name, v, score) for name, (v, scores) in conditions.items() for score in scores]
    for (weight, push), report in always.items():
        for name, vector, score in pairs:
            thresholds: set[float] = set()
            for target in fpr_grid:
                calibration = score.calibrate(target)
                if calibration.threshold in thresholds:
                    continue  # a coarser target that gives the same threshold
                thresholds.add(calibration.threshold)
                gated = gated_report(
                    unedited,
                    report,
                    score.fires("validation.fire", calibration.threshold)[: unedited.n],
                    score.fires("validation.quiet", calibration.threshold)[: len(unedited.kl_rows)],
                )
                candidates.append(Candidate(weight, push, name, vector, calibration, gated))
    return candidates


def _rate(report: RateReport) -> float:
    """The rate at the longest reply length."""
    return report.by_length[-1].rate if report.by_length else report.rate


def _choose_gate(
    candidates: list[Candidate],
    max_rate: float,
    max_kl: float | None = None,
    ties: str = "tpr",
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The lowest validation first-token KL (then multi-token KL) among candidates with a
    validation rate (longest length) of at most ``max_rate``; the lowest rate if none has.
    With ``max_kl``: the lowest validation rate among candidates with a validation first-token
    KL of at most it (then the higher validation TPR, or with ``ties="fpr"`` the lower
    validation FPR and then the higher TPR; then the lower KL); the lowest KL if none."""
    if max_kl is not None:
        within = [c for c in candidates if c.report.kl_first_token <= max_kl + 1e-12]

        def order(c: Candidate) -> tuple[float, ...]:
            fpr = c.calibration.validation.false_positive_rate if ties == "fpr" else 0.0
            return (_rate(c.report), fpr, -_tpr(c), c.report.kl_first_token)

        best = (
            min(within, key=order)
            if within
            else min(candidates, key=lambda c: (c.report.kl_first_token, _rate(c.report)))
        )
        return best, _rows(candidates, best)
    allowed = [c for c in candidates if _rate(c.report) <= max_rate + 1e-12]
    if allowed:
        best = min(allowed, key=lambda c: (c.report.kl_first_token, c.report.kl_multi_token))
    else:
        best = min(candidates, key=lambda c: (_rate(c.report), c.report.kl_first_token))
    return best, _rows(candidates, best)


def _summed_text(args: argparse.Namespace) -> str:
    """What the docs say about the --summed candidate hook."""
    if not args.summed:
        return ""
    return (
        " and one reading all of them at once (--summed; hook `blocks.A+B+...`: the sum of "
        "the hooks' projections, each divided by its standard deviation over the quiet train "
        "prompts)"
    )


def _hook_text(hook: str | tuple[str, ...]) -> str:
    """A gate's hook, or its hooks as "blocks.4+8+12.hook_resid_pre"."""
    if isinstance(hook, str):
        return hook
    layers = "+".join(name.split(".")[1] for name in hook)
    return f"blocks.{layers}.hook_resid_pre"


def _tpr(candidate: Candidate) -> float:
    return candidate.calibration.validation.true_positive_rate


def _rows(candidates: list[Candidate], best: Candidate) -> list[dict[str, Any]]:
    return [
        {
            "weight": c.weight,
            "push": c.push,
            "condition": c.condition,
            "gate hook": _hook_text(c.calibration.hook),
            "train FPR target": c.calibration.target_fpr,
            "threshold": c.calibration.threshold,
            "validation TPR": c.calibration.validation.true_positive_rate,
            "validation FPR": c.calibration.validation.false_positive_rate,
            "validation rate": _rate(c.report),
            "validation first-token KL": c.report.kl_first_token,
            "validation multi-token KL": c.report.kl_multi_token,
            "kept": "yes" if c is best else "",
        }
        for c in candidates
    ]


#: how docs/results.md names the scene forms of steer.directions.scene_forms.SCENE_FORMS
_FORM_NAMES = {
    "scene": "as a scene ending in the character's name",
    "chat": "as chat-completion messages ending at the assistant header",
}


def _scene_fires(
    handle: Any, args: argparse.Namespace, splits: dict[str, Any], best: Candidate
) -> dict[str, dict[str, str]]:
    """How many test situations, played in each scene form, the kept gate fires on: those
    with a trigger and the data.gate_quiet ones without (a projection, no generation)."""
    calibration = best.calibration
    # the reads the engine's gate makes: each hook's unit direction times its weight
    reads = calibration.condition(best.vector).reads(
        best, GateScope.PROMPT, handle.resolver, handle.d_model
    )
    hooks = [point.name for point, _ in reads]
    counts: dict[str, dict[str, str]] = {}
    for form in SCENE_FORMS:
        render = scene_prompt(handle, form)
        counts[form] = {}
        for name, texts in (
            ("trigger", splits["positive"].test),
            ("trigger-free", splits["quiet"].test),
        ):
            ids = [render(text) for text in texts]
            last = forward(handle, ids, hooks=hooks, batch_size=args.batch_size).activations
            projection = sum(last[point.name] @ read.unit for point, read in reads)
            assert isinstance(projection, torch.Tensor)
            fired = (
                projection < calibration.threshold
                if calibration.below
                else projection > calibration.threshold
            )
            counts[form][name] = f"{int(fired.sum())} / {len(ids)}"
    return counts


def _evaluator(
    handle: Any, args: argparse.Namespace, matcher: Any, positive: list[str], negative: list[str]
) -> Any:
    """evaluate(edits) -> RateReport on these prompts, base continuations computed once."""
    return rate_evaluator(
        handle,
        positive,
        negative,
        matcher=matcher,
        lengths=args.lengths,
        kl_tokens=args.kl_tokens,
        batch_size=args.batch_size,
    )


def _conditions(
    handle: Any,
    args: argparse.Namespace,
    artifact: Any,
    recipe: Any,
    layers: list[int],
) -> tuple[dict[str, tuple[Any, list[GateScores]]], PromptReads, dict[str, list[str]] | None]:
    """{condition name: (its vector, its GateScores at each candidate hook)} for --conditions,
    every prompt read once, as ``steer directions gate`` reads them
    (:func:`steer.directions.gating.gate_reads`); the reads; each read prompt's source (None
    without the recipe's extras). With --scenes, the situations rendered as RP scenes come after
    the one-message prompts on each side, so the first prompts of each validation side are still
    the ones the validation runs generated for."""
    hooks = [f"blocks.{n}.hook_resid_pre" for n in layers]
    reads, labels = gate_reads(
        handle, recipe, hooks, scenes=args.scenes, batch_size=args.batch_size
    )
    conditions = {name: reads.gate(name, artifact.vector) for name in args.conditions}
    if args.summed and len(hooks) > 1:
        for _vector, scores in conditions.values():
            scores.append(summed_scores(scores))
    return conditions, reads, labels


def _gate(
    handle: Any, args: argparse.Namespace, artifact: Any, splits: dict[str, Any], recipe: Any,
    matcher: Any, seconds: dict[str, float], ablated: list[Path],
) -> tuple[Candidate, list[dict[str, Any]], dict[str, Any], StyleRates | None]:  # fmt: skip
    """The kept candidate, every candidate's validation row, the validation reference (the edit
    ablates the artifacts at ``ablated``), and the kept gate's rates on a source it was not
    fitted on (:func:`steer.directions.gate_styles.new_source_rates`)."""
    layer = int(artifact.metadata.get("layer") or artifact.vector.layers[0])
    layers = sorted({layer, *(int(x) for x in args.gate_layers.split(",") if x.strip())})
    # (blocks.0.hook_resid_pre holds the last chat token's embedding: the same for every prompt)
    layers = [layer for layer in layers if layer > 0]
    conditions, reads, labels = timed(
        seconds, "gate_scores", lambda: _conditions(handle, args, artifact, recipe, layers)
    )
    cap = args.max_validation or None
    evaluate = _evaluator(
        handle,
        args,
        matcher,
        list(splits["positive"].validation)[:cap],
        list(quiet_prompts(splits, "validation"))[:cap],
    )
    unedited = timed(seconds, "validation_unedited", lambda: evaluate(()))
    always = {
        (weight, push): timed(
            seconds,
            f"validation_always_on_{weight:g}" + (f"_push_{push:g}" if push else ""),
            lambda weight=weight, push=push: evaluate(
                recipe_interventions(ablation_recipe(ablated, weight, push=push), handle)
            ),
        )
        for weight in args.weights
        for push in args.pushes
    }
    lowest = min(_rate(report) for report in always.values())
    max_rate = lowest if args.max_rate is None else args.max_rate
    candidates = _candidates(conditions, args.fpr_grid, unedited, always)
    best, rows = _choose_gate(candidates, max_rate, args.max_kl, args.ties)
    new_source = new_source_rates(reads, labels, best.condition, artifact.vector, best.calibration)
    reference = {
        "unedited rate": _rate(unedited),
        "always on": [
            {
                "weight": weight,
                "push": push,
                "validation rate": _rate(report),
                "validation first-token KL": report.kl_first_token,
                "validation multi-token KL": report.kl_multi_token,
                "validation repetition in reply": reply_repetition(report),
            }
            for (weight, push), report in always.items()
        ],
        "max rate": max_rate,
        "max kl": args.max_kl,
        "ties": args.ties,
        "new source": None if new_source is None else asdict(new_source),
    }
    return best, rows, reference, new_source


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    if not args.conditions or set(args.conditions) - set(CONDITIONS):
        parser.error(f"--conditions: some of {', '.join(CONDITIONS)}; got {args.conditions}")
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    recipe = load_direction_recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    directory = Path(args.direction) if args.direction else None
    if directory is None:
        directory = timed(
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
    splits = gate_splits(recipe)
    if args.no_gate_quiet:
        splits.pop("quiet", None)
    args.scenes = recipe.data.gate_scenes and not args.no_gate_scenes
    matcher = is_moralizing if recipe.kind is RecipeKind.PAIRS else is_refusal
    ablated = [directory, *args.also]  # what the edit ablates: the direction, then --also
    best, calibration_rows, reference, new_source = _gate(
        handle, args, artifact, splits, recipe, matcher, seconds, ablated
    )
    calibration = best.calibration
    condition = directory if best.condition == "direction" else best.vector
    gated_path = gated_ablation_recipe(
        out,
        ablated,
        condition,
        calibration,
        weight=best.weight,
        push=best.push,
        handle=handle,
        new_source=new_source,
    )
    if args.validation_only:
        kept = [row for row in calibration_rows if row["kept"]]
        emit(
            {
                "validation": reference,
                "kept": kept,
                "gate": calibration_rows,  # every candidate, to compare configurations by
                "recipe": str(gated_path),
                "seconds": seconds,
            }
        )
        return 0
    # what the recipes hold, lowered as a server or `steer eval --edits` lowers them
    always = recipe_interventions(ablation_recipe(ablated, best.weight, push=best.push), handle)
    gated = recipe_interventions(gated_path, handle)

    # the test split, once
    cap = args.max_test or None
    harmful = list(splits["positive"].test)[:cap]
    harmless = list(splits["negative"].test)[:cap]
    quiet = list(splits["quiet"].test)[:cap] if "quiet" in splits else []
    evaluate = timed(
        seconds,
        "base_continuations",
        lambda: _evaluator(handle, args, matcher, harmful, harmless + quiet),
    )
    reports = {
        name: timed(seconds, f"evaluate_{name}", lambda edits=edits: evaluate(edits))
        for name, edits in (("unedited", ()), ("always on", always), ("gated", gated))
    }
    scene_fires = _scene_fires(handle, args, splits, best) if args.scenes else {}
    rows = [rate_row(name, report, len(harmless), len(quiet)) for name, report in reports.items()]
    record = {
        "kind": "moralizing" if recipe.kind is RecipeKind.PAIRS else "refusal",
        "model": args.model,
        "direction": str(directory),
        "also": [str(path) for path in args.also],
        "validation": reference,
        "gate": calibration_rows,
        "test": rows,
        "test scenes fired": scene_fires,
        **run_facts(seconds, load_before),
    }
    emit(record)
    if not args.no_docs:
        _write_docs(args, record, rows, calibration_rows, command, recipe.data)
    return 0


def _write_docs(
    args: argparse.Namespace,
    record: dict[str, Any],
    rows: list[dict[str, Any]],
    calibration_rows: list[dict[str, Any]],
    command: str,
    data: DataSection,
) -> None:
    lengths = [f"rate @{n}" for n in args.lengths]
    quiet = ["quiet first-token KL", "quiet multi-token KL", "quiet moved"]
    quiet = quiet if quiet[0] in rows[0] else []
    columns = ["edit", *lengths, "first-token KL", "multi-token KL", *quiet]
    columns += ["repetition in reply", "n"]
    ablated = ", ".join(f"`{path}`" for path in record["also"])
    also = (
        f" (ablated with {ablated}, at the same weight and behind the same gate)" if ablated else ""
    )
    fire_text = (
        " The recipe's data.gate_fire prompts are fire prompts too: they join the calibration "
        "and the validation TPR, not the rates (read on the positive set's replies)."
        if data.gate_fire
        else ""
    )
    harmless_text = (
        f" The recipe's data.gate_harmless prompts ({_files(data.gate_harmless)}) join the "
        "harmless ones in every split: the calibration, the validation KL and the test KL."
        if data.gate_harmless
        else ""
    )
    quiet_text = (
        f" The recipe's data.gate_quiet prompts ({args.recipe}) are quiet prompts too: the gate "
        "is calibrated to stay quiet on them, the validation KL below is over both sets, and "
        "the test table gives their KL (*quiet*) and how many of them the edit moved (first-"
        "token KL above 0) apart from the harmless ones'."
        if quiet
        else ""
    )
    quiet_text = fire_text + harmless_text + quiet_text
    fired = record["test scenes fired"]
    scenes_text = (
        "\nThe gate is calibrated on the situations played as RP scenes too (data.gate_scenes). "
        "On the test situations played that way it fires on: "
        + "; ".join(
            f"{_FORM_NAMES.get(form, form)}, {counts['trigger']} with a trigger and "
            f"{counts['trigger-free']} without one"
            for form, counts in fired.items()
        )
        + " (a projection at the prompt's last token, no generation).\n"
        if fired
        else ""
    )
    kind = record["kind"]
    v = record["validation"]
    rule = _rule_text(v, args, calibration_rows)
    best = next(row for row in calibration_rows if row["kept"])
    kept_text = (
        f"The row kept: weight {best['weight']:g}, push {best['push']:g}; the "
        f"{best['condition']} gate at `{best['gate hook']}`, threshold {best['threshold']:.4g} "
        f"(validation TPR {best['validation TPR']:.3f}, FPR {best['validation FPR']:.3f})."
    )
    if v.get("new source"):
        held = v["new source"]
        kept_text += (
            " Fitted and calibrated the same way without each source of prompts in turn ("
            + ", ".join(held["by_style"])
            + f"), on the held-out one it fires on {held['true_positive_rate']:.3f} of "
            f"{held['fire_count']} prompts it should fire on and "
            f"{held['false_positive_rate']:.3f} of {held['quiet_count']} it should not: what "
            "requests written unlike every train prompt may see "
            "(steer.directions.gate_styles)."
        )
    rated = (
        "moralizing rate on the held-out RP situations (recipes/data/moralizing_pairs.jsonl)"
        if kind == "moralizing"
        else "refusal rate on the held-out test split of the recipe's harmful prompts"
    )
    heading = f"Gated {kind} ablation" + (f", {args.section}" if args.section else "")
    markdown = f"""## {heading} (`scripts/eval_gated.py`)

Model `{args.model}`, direction `{record["direction"]}`{also}. Every choice on train /
validation; the test split measured once, after them: {rated}, with
the phrase matcher over each greedy reply's first N tokens (Wilson 95% intervals); first-token
and multi-token KL (over the base model's first {args.kl_tokens} greedy tokens) on the held-out
harmless test split; repetition in reply: the mean share of a reply's word 3-grams that occurred
earlier in it, over the replies the rate is read from (an edit that breaks the model rather than
moves it lowers the rate and raises this). The direction is ablated at every layer (weight
chosen with the gate on validation from --weights; push, the direction also subtracted at its
own hook at that strength, from --pushes), always on or behind a prompt-scope
gate.{quiet_text}

Gate choice (no test prompt read). Candidate thresholds come from train: for each target in
{", ".join(str(x) for x in args.fpr_grid)}, the lowest with that train false-positive rate at
most, at each candidate hook{_summed_text(args)}. The validation split is evaluated unedited (rate
{v["unedited rate"]:.3f} at {max(args.lengths)} tokens) and with the edit always on at each
weight and push:

{table(v["always on"], list(v["always on"][0]))}

and these give every candidate's validation figures (a request whose gate fires runs as always
on, prompt included; any other as unedited). {rule}

{table(calibration_rows, list(calibration_rows[0]))}

{kept_text}

Test split, measured once:

{table(rows, columns)}
{scenes_text}
{run_footer(record, command)}"""
    section = args.section or ("gated" if kind == "refusal" else f"gated-{kind}")
    write_section("results.md", section, markdown)


def _files(sources: tuple[str, ...]) -> str:
    """Data files as the docs name them: each in backticks, joined by commas."""
    return ", ".join(f"`{source}`" for source in sources)


def _rule_text(v: dict[str, Any], args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The sentence that states how the kept candidate was chosen."""
    if v.get("max kl") is not None:
        within = any(row["validation first-token KL"] <= v["max kl"] + 1e-12 for row in rows)
        return (
            "Kept: the lowest validation rate among the candidates with a validation first-"
            f"token KL of at most {v['max kl']:g} (--max-kl), ties to "
            + (
                "the lower validation FPR (--ties fpr), then the higher validation TPR"
                if v.get("ties") == "fpr"
                else "the higher validation TPR"
            )
            + ", then the lower KL"
            + ("." if within else "; no candidate reached it, so the lowest KL.")
        )
    reached = any(row["validation rate"] <= v["max rate"] + 1e-12 for row in rows)
    source = "the lowest always-on validation rate" if args.max_rate is None else "--max-rate"
    return (
        "Kept: the lowest validation first-token KL among the candidates with a validation "
        f"rate of at most {v['max rate']:.3f} ({source})"
        + (
            "."
            if reached
            else "; no candidate reached it, so the lowest validation rate, then the lowest KL."
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
