"""How a prompt-scope gate does on prompts written in a style it was not fitted on.

A gate's validation figures come from prompts drawn from the same sets as its train prompts: the
same writers, the same phrasings. A user's requests are not. :func:`held_out_styles` gives an
estimate for new styles from the prompts one already has, when each carries a style label (a
source file, or a block of one phrasing): for each style in turn, the gate is fitted and
calibrated exactly as :meth:`steer.calibration.PromptReads.gate` and
:meth:`~steer.calibration.GateScores.calibrate` do, on every train and validation prompt of the
*other* styles, and its true- and false-positive rates are read on the held-out style's prompts;
the rates are pooled over the styles. Prompts labelled ``""`` are never held out (they stay in
every fit). Reads only train and validation prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steer.calibration import PromptReads
from steer.errors import InvalidArgumentError
from steer.vectors import SteeringVector

__all__ = ["StyleRates", "held_out_styles"]

#: the keys of a :class:`PromptReads` with a validation split
KEYS = ("train.fire", "train.quiet", "validation.fire", "validation.quiet")


@dataclass(frozen=True)
class StyleRates:
    """At one hook: the rates on held-out styles, pooled, and on each style alone."""

    hook: str | tuple[str, ...]
    true_positive_rate: float
    false_positive_rate: float
    fire_count: int
    quiet_count: int
    #: {style: (true-positive rate, false-positive rate)} when it was held out
    by_style: Mapping[str, tuple[float, float]]


def held_out_styles(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]],
    condition: str,
    direction: SteeringVector | torch.Tensor,
    *,
    target_fpr: float = 0.02,
) -> list[StyleRates]:
    """For each hook of ``reads`` (in order), a gate of ``condition`` (see
    :data:`steer.calibration.CONDITIONS`; ``direction`` is the edit's) calibrated at
    ``target_fpr`` without each style, measured on it. ``labels[key]`` gives a style for each
    prompt of ``reads.read[key]`` (every key of :data:`KEYS`); a style must have prompts on both
    sides to be held out."""
    styles = _styles(reads, labels)
    counts: dict[int, list[int]] = {}
    by_style: dict[int, dict[str, tuple[float, float]]] = {}
    hooks: list[str | tuple[str, ...]] = []
    for style in styles:
        held = {key: torch.tensor([label == style for label in labels[key]]) for key in KEYS}
        fold = PromptReads(reads.points, _fold(reads, held))
        _, scores = fold.gate(condition, direction)
        hooks = [score.hook for score in scores]
        for index, score in enumerate(scores):
            calibration = score.calibrate(target_fpr)
            fired = [sum(score.fires(f"validation.{side}", calibration.threshold))
                     for side in ("fire", "quiet")]  # fmt: skip
            total = counts.setdefault(index, [0, 0, 0, 0])
            rates = calibration.validation
            total[0] += fired[0]
            total[1] += rates.fire_count
            total[2] += fired[1]
            total[3] += rates.quiet_count
            by_style.setdefault(index, {})[style] = (
                rates.true_positive_rate,
                rates.false_positive_rate,
            )
    return [
        StyleRates(
            hook=hook,
            true_positive_rate=counts[i][0] / counts[i][1],
            false_positive_rate=counts[i][2] / counts[i][3],
            fire_count=counts[i][1],
            quiet_count=counts[i][3],
            by_style=by_style[i],
        )
        for i, hook in enumerate(hooks)
    ]


def _styles(reads: PromptReads, labels: Mapping[str, Sequence[str]]) -> list[str]:
    """The styles that have prompts on both sides, in first-seen order; checks ``labels``."""
    for key in KEYS:
        if key not in reads.read:
            raise InvalidArgumentError(f"the reads have no {key} prompts", field="reads")
        rows = len(next(iter(reads.read[key].values())))
        if key not in labels or len(labels[key]) != rows:
            raise InvalidArgumentError(
                f"expected a style for each of the {rows} {key} prompts", field=f"labels.{key}"
            )
    fire = [s for key in KEYS if key.endswith("fire") for s in labels[key] if s]
    quiet = {s for key in KEYS if key.endswith("quiet") for s in labels[key] if s}
    styles = [s for s in dict.fromkeys(fire) if s in quiet]
    if len(styles) < 2:
        raise InvalidArgumentError(
            "needs at least two styles with prompts on both sides", field="labels"
        )
    return styles


def _fold(
    reads: PromptReads, held: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Train: every train and validation prompt outside the held style; validation: the held
    style's prompts."""
    fold: dict[str, dict[str, torch.Tensor]] = {}
    for side in ("fire", "quiet"):
        parts = [
            (reads.read[f"{split}.{side}"], held[f"{split}.{side}"])
            for split in ("train", "validation")
        ]
        hooks = parts[0][0].keys()
        fold[f"train.{side}"] = {
            hook: torch.cat([rows[hook][~mask] for rows, mask in parts]) for hook in hooks
        }
        fold[f"validation.{side}"] = {
            hook: torch.cat([rows[hook][mask] for rows, mask in parts]) for hook in hooks
        }
    return fold
