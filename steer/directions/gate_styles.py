"""How a prompt-scope gate does on prompts written in a style it was not fitted on.

A gate's validation figures come from prompts drawn from the same sets as its train prompts: the
same writers, the same phrasings. A user's requests are not. :func:`held_out_styles` gives an
estimate for new styles from the prompts one already has, when each carries a style label (a
source file, or a block of one phrasing): for each style in turn, the gate is fitted and
calibrated exactly as :meth:`steer.calibration.PromptReads.gate` and
:meth:`~steer.calibration.GateScores.calibrate` do, on every train and validation prompt of the
*other* styles, and its true- and false-positive rates are read on the held-out style's prompts;
the rates are pooled over the styles. Prompts labelled ``""`` are never held out (they stay in
every fit). Reads only train and validation prompts. ``steer directions gate --choose
new-source`` keeps the candidate these rates separate best.

:func:`new_source_levels` turns the same folds into a calibration (``steer directions gate
--calibrate new-source``): the threshold, as a level in standard deviations above the mean quiet
train score, at which the held-out styles' quiet prompts, pooled, fire at most at the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from steer.calibration import (
    ContrastPrompts,
    GateCalibration,
    GateScores,
    PromptReads,
    lowest_threshold,
    summed_scores,
)
from steer.directions import data as datasets
from steer.directions.recipe import DirectionRecipe, RecipeKind
from steer.errors import InvalidArgumentError
from steer.vectors import SteeringVector

__all__ = [
    "StyleRates",
    "candidate_rates",
    "has_sources",
    "held_out_styles",
    "new_source_levels",
    "new_source_rates",
    "source_labels",
    "train_level",
]

T = TypeVar("T")

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
    #: calibrated on new sources (:func:`new_source_levels`): the threshold, in standard
    #: deviations above the mean quiet train score of the gate it belongs to
    level: float | None = None


def held_out_styles(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]],
    condition: str,
    direction: SteeringVector | torch.Tensor,
    *,
    target_fpr: float = 0.02,
    summed: bool = False,
    each_set: bool = False,
) -> list[StyleRates]:
    """For each hook of ``reads`` (in order; with ``summed`` and several hooks, then the gate
    reading all of them, :func:`steer.calibration.summed_scores`), a gate of ``condition`` (see
    :data:`steer.calibration.CONDITIONS`; ``direction`` is the edit's) calibrated at
    ``target_fpr`` without each style, measured on it. ``labels[key]`` gives a style for each
    prompt of ``reads.read[key]`` (every key of :data:`KEYS`); a style must have prompts on both
    sides to be held out. With ``each_set``, each fold's gate is calibrated on each of its quiet
    sets apart (:meth:`~steer.calibration.GateScores.calibrate`)."""

    def rates(score: GateScores) -> tuple[int, int, int, int]:
        calibration = score.calibrate(target_fpr, each_set=each_set)
        fired = [sum(score.fires(f"validation.{side}", calibration.threshold))
                 for side in ("fire", "quiet")]  # fmt: skip
        counts = calibration.validation
        return fired[0], counts.fire_count, fired[1], counts.quiet_count

    hooks, by_fold = _by_fold(reads, labels, condition, direction, summed, rates)
    pooled = [[sum(c[i] for c in folds.values()) for i in range(4)] for folds in by_fold]
    return [
        StyleRates(
            hook=hook,
            true_positive_rate=fire / fire_count,
            false_positive_rate=quiet / quiet_count,
            fire_count=fire_count,
            quiet_count=quiet_count,
            by_style={style: (c[0] / c[1], c[2] / c[3]) for style, c in by_fold[index].items()},
        )
        for index, (hook, (fire, fire_count, quiet, quiet_count)) in enumerate(
            zip(hooks, pooled, strict=True)
        )
    ]


def new_source_levels(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]],
    condition: str,
    direction: SteeringVector | torch.Tensor,
    *,
    target_fpr: float = 0.02,
    summed: bool = False,
    floors: Sequence[float | None] | None = None,
) -> list[StyleRates]:
    """A threshold calibrated on new sources instead of train prompts, for each candidate of
    :func:`held_out_styles` (each hook, then the summed one): each style's prompts are scored by
    the gate fitted without it, in standard deviations above the mean of that fit's quiet train
    scores (:meth:`~steer.calibration.GateScores.spread`); ``level`` is the lowest such
    standardized threshold whose false-positive rate over every held-out style's quiet prompts
    together is at most ``target_fpr``, raised to the candidate's entry of ``floors`` where that
    is higher (the level its train-calibrated threshold stands at, :func:`train_level`, which
    the threshold is never lowered below), and the rates are those at it (fitted, not an
    estimate: the level was chosen on them)."""

    def standardized(score: GateScores) -> dict[str, list[float]]:
        mean, spread = score.spread()
        return {
            side: [(p - mean) / spread for p in score.read[f"validation.{side}"]]
            for side in ("fire", "quiet")
        }

    hooks, by_fold = _by_fold(reads, labels, condition, direction, summed, standardized)
    bounds = [None] * len(hooks) if floors is None else list(floors)
    return [
        _at_level(hook, scored, target_fpr, floor)
        for hook, scored, floor in zip(hooks, by_fold, bounds, strict=True)
    ]


def _at_level(
    hook: str | tuple[str, ...],
    scored: Mapping[str, Mapping[str, list[float]]],
    target_fpr: float,
    floor: float | None = None,
) -> StyleRates:
    """The rates of the standardized held-out scores ``scored`` ({style: {side: scores}}) at the
    lowest level with a pooled false-positive rate of at most ``target_fpr``, or at ``floor``
    where that is higher."""
    quiet = [p for sides in scored.values() for p in sides["quiet"]]
    level = lowest_threshold(quiet, target_fpr)
    if floor is not None:
        level = max(level, floor)

    def rate(scores: Sequence[float]) -> float:
        return sum(p > level for p in scores) / len(scores)

    fire = [p for sides in scored.values() for p in sides["fire"]]
    return StyleRates(
        hook=hook,
        true_positive_rate=rate(fire),
        false_positive_rate=rate(quiet),
        fire_count=len(fire),
        quiet_count=len(quiet),
        by_style={s: (rate(sides["fire"]), rate(sides["quiet"])) for s, sides in scored.items()},
        level=level,
    )


def candidate_rates(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]] | None,
    condition: str,
    direction: SteeringVector | torch.Tensor,
    *,
    target_fpr: float,
    summed: bool = False,
    calibrate: str = "train",
    floors: Sequence[float | None] | None = None,
) -> list[StyleRates | None]:
    """For each candidate gate of ``condition`` (each hook of ``reads``, then with ``summed``
    the summed one): with ``calibrate="train"`` (or "each-set", each quiet set apart)
    :func:`held_out_styles`, with "new-source" :func:`new_source_levels` (no lower than
    ``floors``); None for each where there are no labels or a source is too small to fit a gate
    without it."""
    count = len(reads.points) + (1 if summed and len(reads.points) > 1 else 0)
    if labels is None:
        return [None] * count
    rates = (
        partial(new_source_levels, floors=floors)
        if calibrate == "new-source"
        else partial(held_out_styles, each_set=calibrate == "each-set")
    )
    try:
        return list(
            rates(reads, labels, condition, direction, target_fpr=target_fpr, summed=summed)
        )
    except InvalidArgumentError:
        return [None] * count


def _fold_scores(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]],
    condition: str,
    direction: SteeringVector | torch.Tensor,
    summed: bool,
) -> Iterator[tuple[str, list[GateScores]]]:
    """For each style (:func:`_styles`), the candidates' scores of a gate of ``condition``
    fitted without it: train, every other style's train and validation prompts; validation, the
    style's own."""
    for style in _styles(reads, labels):
        held = {key: torch.tensor([label == style for label in labels[key]]) for key in KEYS}
        _, scores = _fold(reads, held).gate(condition, direction)
        if summed and len(scores) > 1:
            scores.append(summed_scores(scores))
        yield style, scores


def _by_fold(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]],
    condition: str,
    direction: SteeringVector | torch.Tensor,
    summed: bool,
    read: Callable[[GateScores], T],
) -> tuple[list[str | tuple[str, ...]], list[dict[str, T]]]:
    """The candidates' hooks, and for each candidate ``read`` of its scores in each fold of
    :func:`_fold_scores` ({style held out: what ``read`` gave})."""
    hooks: list[str | tuple[str, ...]] = []
    by_fold: list[dict[str, T]] = []
    for style, scores in _fold_scores(reads, labels, condition, direction, summed):
        hooks = [score.hook for score in scores]
        by_fold = by_fold or [{} for _ in scores]
        for folds, score in zip(by_fold, scores, strict=True):
            folds[style] = read(score)
    return hooks, by_fold


def train_level(score: GateScores, target_fpr: float) -> float:
    """Where ``score``'s train-calibrated threshold (:meth:`GateScores.calibrate`) stands, in
    standard deviations above the mean of its quiet train scores (:meth:`GateScores.spread`)."""
    calibration = score.calibrate(target_fpr)
    mean, spread = score.spread()
    trained = -calibration.threshold if calibration.below else calibration.threshold
    return (trained - mean) / spread


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


def _fold(reads: PromptReads, held: Mapping[str, torch.Tensor]) -> PromptReads:
    """``reads`` refolded: train, every train and validation prompt outside the held style;
    validation, the held style's prompts (each prompt's quiet set and form alike)."""
    parts: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for side in ("fire", "quiet"):
        keys = (f"train.{side}", f"validation.{side}")
        parts[f"train.{side}"] = [(key, ~held[key]) for key in keys]
        parts[f"validation.{side}"] = [(key, held[key]) for key in keys]
    return reads.regrouped(parts)


def new_source_rates(
    reads: PromptReads,
    labels: Mapping[str, Sequence[str]] | None,
    condition: str,
    direction: SteeringVector | torch.Tensor,
    kept: GateCalibration,
) -> StyleRates | None:
    """The gate ``kept`` (of ``condition``, calibrated on train from ``reads``; at one hook, or
    summed over all of them) fitted and calibrated without each source of ``labels``
    (:func:`source_labels`) in turn, read on it: its entry of :func:`candidate_rates`, the
    folds fitted at its own hooks alone."""
    hooks = (kept.hook,) if isinstance(kept.hook, str) else kept.hook
    only = replace(
        reads,
        points=tuple(point for point in reads.points if point.name in hooks),
        read={key: {hook: rows[hook] for hook in hooks} for key, rows in reads.read.items()},
    )
    rates = candidate_rates(
        only, labels, condition, direction, target_fpr=kept.target_fpr, summed=len(hooks) > 1
    )
    return rates[-1]


def source_labels(
    recipe: DirectionRecipe,
    prompts: Mapping[str, ContrastPrompts],
    origins: Mapping[str, ContrastPrompts] | None = None,
) -> dict[str, list[str]] | None:
    """Each prompt's source, for :func:`held_out_styles`, keyed as
    :class:`~steer.calibration.PromptReads` keys its reads ("train.fire", ...; ``prompts`` by
    split). With a contrast recipe's ``data.positive_extra`` and ``negative_extra``: "own sets"
    for one of its positive / negative sets; "extras" where each extra names one set, else the
    i-th set of each side together as one source, named by their files. Otherwise, with
    ``data.gate_fire`` and ``data.gate_quiet`` naming as many files each (two or more): the i-th
    file of each together, named by their files (for moralizing, each check set's villain and
    trigger-free situations, written together). ``origins`` (by split,
    :func:`steer.directions.gating.gate_origins`) gives the text each of the first prompts of a
    side was made from, so a situation rendered as a scene has its situation's source; any other
    prompt (past them, such as played scenes, or not text) is labelled "" (never held out).
    None without such sources."""
    data = recipe.data
    if _has_extras(recipe):
        names, own = ("positive_extra", "negative_extra"), _own_sets(recipe)
    elif _has_gate_sources(recipe):
        names, own = ("gate_fire", "gate_quiet"), set()
    else:
        return None
    paths = [getattr(data, name) for name in names]
    single = names[0] == "positive_extra" and all(len(side) == 1 for side in paths)
    source: dict[str, str] = {}
    for name in names:
        for index, texts in enumerate(datasets.extra_sets(recipe, name)):
            files = [
                Path(side[index].removeprefix("recipes:")).name
                for side in paths
                if index < len(side)
            ]
            for text in texts:
                source.setdefault(text, "extras" if single else " + ".join(files))
    source |= dict.fromkeys(own - source.keys(), "own sets")
    made_from = prompts if origins is None else origins

    def labels(part: str, side: str) -> list[str]:
        texts = getattr(made_from[part], side)
        named = [source.get(text, "") if isinstance(text, str) else "" for text in texts]
        return named + [""] * (len(getattr(prompts[part], side)) - len(named))

    return {f"{part}.{side}": labels(part, side) for part in prompts for side in ("fire", "quiet")}


def _has_extras(recipe: DirectionRecipe) -> bool:
    data = recipe.data
    return recipe.kind is not RecipeKind.PAIRS and bool(data.positive_extra and data.negative_extra)


def _has_gate_sources(recipe: DirectionRecipe) -> bool:
    data = recipe.data
    return len(data.gate_fire) == len(data.gate_quiet) >= 2


def has_sources(recipe: DirectionRecipe) -> bool:
    """Whether :func:`source_labels` gives ``recipe``'s prompts sources."""
    return _has_extras(recipe) or _has_gate_sources(recipe)


def _own_sets(recipe: DirectionRecipe) -> set[str]:
    sets = datasets.contrast_sets(recipe)
    return {*sets["positive"], *sets["negative"]}
