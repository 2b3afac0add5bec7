"""SAE codes (a probe, an OR of features) as a gate's condition, beside the discriminant.

    python scripts/sae_gate_probe.py --sae SAE [--recipe recipes/moralizing-gate.toml]

Reads the recipe's gate prompts (train and validation, every form: one message, scenes, chat)
once at the SAE's hook, as ``steer directions gate --sae`` does, and calibrates a prompt-scope
gate on each of these conditions at the same false-positive target:

* ``discriminant``: Fisher's discriminant on the residual, as ``steer directions gate
  --condition discriminant`` fits it (three quarters of the train prompts; the threshold on
  the other quarter);
* ``logistic probe on the residual``: an L2-regularised logistic regression on the residual,
  the two sides weighted equally (a second linear read of the same numbers, for scale);
* ``best single feature``: ``choose_feature_gate``'s pick (worst-form ranking on train, the
  choice on validation);
* ``OR of features``: the ``--any-of`` best by ``rank_features`` on the fitting prompts, each
  activation put on one scale (the share of those prompts' quiet side it is above), the gate
  firing where the largest share passes its threshold;
* ``logistic probe on the SAE codes``: the same regression on the SAE's feature activations
  (each feature divided by its train spread), at each L2 strength of ``--l2``;
* ``discriminant on the reconstruction`` and ``on the SAE's error``: Fisher's discriminant on
  ``decode(encode(x))`` and on ``x - decode(encode(x))``: where the signal is that the codes
  keep or drop.

Every fitted condition is fitted on the same three quarters of the train prompts and calibrated
on the other quarter; the single feature, which fits nothing, on all of train. Validation
prompts are read only for the figures. Prints one JSON line and writes docs/results.md's
section (default ``sae-probe``). No check set and no test split is read.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import command_line, emit, run_facts, run_footer, table, timed, write_section

from steer.calibration import GateScores, PromptReads
from steer.directions.gating import gate_reads
from steer.directions.recipe import load_direction_recipe
from steer.models import load_model
from steer.sae.conditions import choose_feature_gate, feature_scores, form_rates, rank_features
from steer.sae.loading import SparseAutoencoder, load_sae

ROOT = Path(__file__).resolve().parent.parent
#: Adam steps of the logistic probes (full batch)
STEPS = 600


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="an SAE directory at the gate's hook")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "moralizing-gate.toml"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--l2", default="0.01,0.001", help="L2 strengths of the probes")
    parser.add_argument("--top-features", type=int, default=20)
    parser.add_argument("--any-of", type=int, default=8, help="features ranked for the OR")
    parser.add_argument("--section", default="sae-probe", help="docs/results.md section")
    return parser


def logistic(fire: torch.Tensor, quiet: torch.Tensor, l2: float) -> torch.Tensor:
    """The weights of an L2-regularised logistic regression of fire (1) against quiet (0), the
    two sides weighted equally and each input divided by its spread (returned in the input's
    own units; no bias, which the calibrated threshold replaces). Deterministic: full-batch
    Adam from zero for :data:`STEPS` steps."""
    inputs = torch.cat([fire, quiet]).double()
    spread = inputs.std(0).clamp_min(1e-3)
    scaled = inputs / spread
    target = torch.cat([torch.ones(len(fire)), torch.zeros(len(quiet))]).double()
    weight = torch.cat(
        [torch.full((len(fire),), 0.5 / len(fire)), torch.full((len(quiet),), 0.5 / len(quiet))]
    )
    coefficients = torch.zeros(inputs.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([coefficients, bias], lr=0.05)
    for _ in range(STEPS):
        optimiser.zero_grad()
        logits = scaled @ coefficients + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, weight=weight.double(), reduction="sum"
        )
        (loss + l2 * coefficients.square().sum()).backward()
        optimiser.step()
    return (coefficients.detach() / spread).float()


def mapped(
    reads: PromptReads, hook: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> PromptReads:
    """``reads`` with every read at ``hook`` replaced by ``transform`` of it, in batches."""

    def apply(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [transform(rows[i : i + 256]).float() for i in range(0, len(rows), 256)]
            )

    return replace(
        reads, read={key: {hook: apply(by_hook[hook])} for key, by_hook in reads.read.items()}
    )


def _row(name: str, reads: PromptReads, scores: GateScores, target_fpr: float) -> dict[str, Any]:
    """A table row: the gate's calibration at ``target_fpr`` and its validation rates, pooled
    and by prompt form (TPR / FPR)."""
    calibration = scores.calibrate(target_fpr)
    by_form = form_rates(reads, scores, calibration.threshold)
    worst = min(
        [
            calibration.validation.true_positive_rate,
            *(t for t, _f in by_form.values() if not math.isnan(t)),
        ]
    )
    row: dict[str, Any] = {
        "condition": name,
        "train FPR": round(calibration.train.false_positive_rate, 3),
        "validation TPR": round(calibration.validation.true_positive_rate, 3),
        "validation FPR": round(calibration.validation.false_positive_rate, 3),
        "worst-form TPR": round(worst, 3),
    }
    for form, (tpr, fpr) in by_form.items():
        row[form] = f"{tpr:.3f} / {fpr:.3f}"
    return row


def conditions(
    reads: PromptReads, sae: SparseAutoencoder, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per condition (the module docstring's list), in that order."""
    hook, target = sae.hook_name, args.target_fpr
    rows = []

    def fitted(name: str, on: PromptReads, fit: Callable[[PromptReads], Any]) -> None:
        fit_part, calibrate_part = on.split_train()
        vector = fit(fit_part)
        [scores] = calibrate_part.scores(vector)
        rows.append(_row(name, calibrate_part, scores, target))

    def probe(l2: float) -> Callable[[PromptReads], torch.Tensor]:
        return lambda part: logistic(
            part.read["train.fire"][hook], part.read["train.quiet"][hook], l2
        )

    def discriminant(part: PromptReads) -> Any:
        return part.condition(discriminant=True)

    strengths = [float(value) for value in args.l2.split(",")]
    fitted("discriminant (residual)", reads, discriminant)
    for l2 in strengths:
        fitted(f"logistic probe, residual, L2 {l2:g}", reads, probe(l2))
    choice = choose_feature_gate(reads, sae, target_fpr=target, k=args.top_features)
    rows.append(
        _row(
            f"best single feature ({choice.feature})",
            reads,
            feature_scores(reads, sae, choice.feature),
            target,
        )
    )
    rows.append(any_of(reads, sae, target, args.any_of))
    codes = mapped(reads, hook, sae.encode)
    for l2 in strengths:
        fitted(f"logistic probe, SAE codes, L2 {l2:g}", codes, probe(l2))
    rebuilt = mapped(reads, hook, lambda rows: sae.decode(sae.encode(rows)))
    fitted("discriminant, SAE reconstruction", rebuilt, discriminant)
    error = mapped(reads, hook, lambda rows: rows - sae.decode(sae.encode(rows)))
    fitted("discriminant, SAE error", error, discriminant)
    return rows


def any_of(reads: PromptReads, sae: SparseAutoencoder, target: float, count: int) -> dict[str, Any]:
    """The row of an OR of features: the ``count`` best by :func:`rank_features` on three
    quarters of the train prompts (those that separate at all); each feature's activation
    turned into the share of those quarters' quiet prompts it is above (so the features share
    one scale: a smallest p-value), the OR's score the largest share over them; that score's
    threshold calibrated on the fourth quarter as every fitted condition's is."""
    hook = sae.hook_name
    fit, held = reads.split_train()
    ranks = rank_features(fit, sae, target_fpr=target, k=count)
    features = [rank.feature for rank in ranks if rank.worst_form_rate > rank.false_positive_rate]
    with torch.no_grad():
        quiet = sae.encode(fit.read["train.quiet"][hook])[:, features].float()
    ordered = quiet.T.sort(-1).values.contiguous()  # (features, quiet prompts)

    def score(rows: torch.Tensor) -> list[float]:
        with torch.no_grad():
            active = sae.encode(rows)[:, features].float().T.contiguous()
        below = torch.searchsorted(ordered, active)  # quiet prompts strictly below each value
        return (below.float() / ordered.shape[1]).amax(0).tolist()

    store = {key: score(by_hook[hook]) for key, by_hook in held.read.items()}
    scores = GateScores(hook, False, store, quiet_sets=held.quiet_sets.get("train.quiet", ()))
    name = f"OR of {len(features)} features ({', '.join(map(str, features))})"
    return _row(name, held, scores, target)


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    torch.manual_seed(0)
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    sae = load_sae(args.sae, handle, where=args.sae)
    recipe = load_direction_recipe(args.recipe)
    reads, _labels = timed(seconds, "read", lambda: gate_reads(handle, recipe, [sae.hook_name]))
    rows = timed(seconds, "fit", lambda: conditions(reads, sae, args))
    counts = {key: len(by_hook[sae.hook_name]) for key, by_hook in reads.read.items()}
    record = {
        "script": "sae_gate_probe",
        "model": args.model,
        "recipe": args.recipe,
        "sae": {"hook": sae.hook_name, "features": sae.num_features},
        "target_fpr": args.target_fpr,
        "prompts": counts,
        "rows": rows,
        **run_facts(seconds, load_before),
    }
    emit(record)
    forms = sorted({form for labels in reads.forms.values() for form in labels})
    columns = [
        "condition",
        "train FPR",
        "validation TPR",
        "validation FPR",
        "worst-form TPR",
        *forms,
    ]
    markdown = f"""## Probes on SAE codes as the gate's condition (`scripts/sae_gate_probe.py`)

Model `{args.model}`; the gate prompts of `{Path(args.recipe).name}` read once at
`{sae.hook_name}` (train {counts["train.fire"]} to fire on / {counts["train.quiet"]} to stay
quiet on; validation {counts["validation.fire"]} / {counts["validation.quiet"]}); an SAE of
{sae.num_features} features at that hook. Each gate's threshold is the lowest with
false-positive rate <= {args.target_fpr:g} on its calibration prompts (for the fitted
conditions the quarter of the train prompts they were not fitted on; for the single feature
all of train). Validation only: no check set and no test split read. The columns by form give
validation TPR / FPR on the prompts of that form; *worst-form TPR* is the lowest TPR over the
forms and the pool.

{table(rows, columns)}

{run_footer(record, command)}"""
    write_section("results.md", args.section, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
