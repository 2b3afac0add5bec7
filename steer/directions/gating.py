"""A gate for a direction's ablation, calibrated on train (steer directions gate).

The gate is calibrated on the recipe's train split, reported on validation and written with the
edit as an edit recipe (:mod:`steer.directions.gate_recipe`).

The gate is prompt scope (CAST): it reads the residual at the chat prompt's last token at one of
the candidate hooks, projected onto a condition vector:

* ``direction`` -- the edited direction itself;
* ``contrast`` -- the train mean it should fire on minus the one it should not (CAST's
  condition vector);
* ``discriminant`` -- that difference whitened by the within-class covariance (Fisher's), which
  discounts what varies among all prompts; fitted on three quarters of the train prompts, its
  threshold calibrated on the other quarter.

At each hook the threshold is the lowest whose false-positive rate on the *train* prompts the gate
should stay quiet on is at most ``target_fpr``; the hook kept is the one whose threshold separates
the *validation* prompts best (true- minus false-positive rate, then the lower false-positive
rate). No test prompt is read. This chooses by separation alone, in a couple of forward passes;
``scripts/eval_gated.py`` chooses among the same candidates by what the edit does on validation
(generation), which costs far more.

Validation prompts come from the same sets as the train ones, and so flatter the gate for
requests written otherwise. With the recipe's ``data.positive_extra`` / ``negative_extra``, the
kept gate is also fitted and calibrated without each source (the recipe's own sets; its extras)
in turn and measured on the held-out one (:mod:`steer.directions.gate_styles`): on refusal data
its false-positive rate there is several times the target (docs/results.md "gate-styles"). So
is every candidate where a recipe's ``data.gate_fire`` / ``gate_quiet`` files pair up into
sources, and ``choose="new-source"`` keeps the candidate that separates held-out sources best
instead of validation; ``calibrate="new-source"`` raises each threshold until the held-out
sources' quiet prompts fire at most at the target (:func:`new_source_levels`).

The prompts: a contrast recipe's two sets; a pairs recipe's (moralizing) situations against the
harmless instructions of ``recipes/refusal.toml``, each split as every step splits them. A
recipe's ``data.gate_quiet`` adds prompts the gate must stay quiet on too: for moralizing,
in-character RP situations without a trigger, without which the gate learns RP against
assistant requests and fires on every RP turn; ``data.gate_fire`` adds prompts it must fire on
(after the positive set's): for moralizing, more villain situations, without replies (the pairs'
situations alone gave a gate that fired on too few new ones); ``data.gate_harmless`` more
ordinary requests, joining the negative set's splits (a false-positive rate of 1% cannot be
calibrated on a few dozen harmless prompts). With ``data.gate_scenes`` the
situations of both sides are also played as RP scenes, in two forms (:data:`SCENE_FORMS`): a
card and the event as the user's turn, the prompt ending in the character's name (as ``steer
eval rp``, gRPC scene requests and named chat requests render them); and the same as
chat-completion messages without names, the prompt ending at the chat template's assistant
header (SillyTavern's Chat Completion).
A threshold calibrated on one-message prompts alone fires on no reply in a played scene.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from steer.activations import KnownReads
from steer.calibration import (
    CONDITIONS,
    ContrastPrompts,
    GateCalibration,
    GateScores,
    Prompt,
    PromptReads,
    read_prompts,
    summed_scores,
)
from steer.directions import data as datasets
from steer.directions.api import contrast_splits
from steer.directions.data import RECIPES_DIR
from steer.directions.gate_scenarios import with_scenarios
from steer.directions.gate_styles import (
    StyleRates,
    candidate_rates,
    has_sources,
    source_labels,
    train_level,
)
from steer.directions.recipe import (
    GATE_SETS,
    DirectionRecipe,
    RecipeKind,
    load_direction_recipe,
)
from steer.directions.scene_forms import SCENE_FORMS, scene_prompts
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle
from steer.rp.scene import situation_scene
from steer.vectors import SteeringVector

__all__ = [
    "CALIBRATIONS",
    "CHOICES",
    "CONDITIONS",
    "GateChoice",
    "check_scenes",
    "choose_from",
    "choose_gate",
    "gate_origins",
    "gate_prompts",
    "gate_reads",
    "gate_splits",
    "quiet_prompts",
    "quiet_sets",
]


def gate_splits(recipe: DirectionRecipe) -> dict[str, datasets.Splits[str]]:
    """``{"positive": Splits, "negative": Splits}``: the prompts a gate for ``recipe``'s
    direction fires on and stays quiet on, train / validation / test; with the recipe's
    ``data.gate_fire``, also ``"fire"``: more prompts it fires on; with ``data.gate_quiet``,
    ``"quiet"``: more prompts it stays quiet on (see :func:`quiet_prompts`); with
    ``data.gate_harmless``, each split of the negative set is followed by that set's."""
    data = recipe.data
    if recipe.kind is not RecipeKind.PAIRS:
        splits = dict(contrast_splits(recipe))
    else:
        situations = [pair.prompt for pair in datasets.recipe_pairs(recipe)]
        positive = datasets.split(
            situations, seed=data.seed, train=data.train, validation=data.validation
        )
        splits = {"positive": positive, "negative": refusal_harmless()}
    for name, key in GATE_SETS.items():
        for prompts in datasets.extra_sets(recipe, name):
            more = datasets.split(
                prompts, seed=data.seed, train=data.train, validation=data.validation
            )
            splits[key] = _joined(splits[key], more) if key in splits else more
    return splits


def refusal_harmless() -> datasets.Splits[str]:
    """recipes/refusal.toml's harmless instructions (its ``data.negative``, not the extra
    training requests) split as that recipe splits them: the ordinary requests a pairs
    recipe's gate stays quiet on."""
    refusal = load_direction_recipe(RECIPES_DIR / "refusal.toml")
    data = refusal.data
    return datasets.split(
        datasets.load_prompts(data.negative, field="data.negative", base=refusal.base),
        seed=data.seed,
        train=data.train,
        validation=data.validation,
    )


def _joined(first: datasets.Splits[str], then: datasets.Splits[str]) -> datasets.Splits[str]:
    """Each split of ``first`` followed by the same split of ``then``."""
    return datasets.Splits(
        *(getattr(first, part) + getattr(then, part) for part in ("train", "validation", "test"))
    )


def quiet_prompts(splits: dict[str, datasets.Splits[str]], part: str) -> tuple[str, ...]:
    """Every prompt of split ``part`` ("train", "validation", "test") a gate stays quiet on:
    the negative set's, then the ``quiet`` set's."""
    return (*getattr(splits["negative"], part), *_part(splits, "quiet", part))


def gate_prompts(
    splits: dict[str, datasets.Splits[str]],
    part: str,
    scenes: Sequence[Callable[[str], Prompt]] = (),
) -> ContrastPrompts:
    """Split ``part``'s prompts a gate fires on (the positive set's first, then the ``fire``
    set's) and those it stays quiet on; for each of ``scenes`` (:func:`scene_prompts`), the
    positive, ``fire`` and ``quiet`` situations again after them, rendered by it."""
    situations = (*getattr(splits["positive"], part), *_part(splits, "fire", part))
    fire: list[Prompt] = list(situations)
    quiet: list[Prompt] = list(quiet_prompts(splits, part))
    for render in scenes:
        fire += [render(text) for text in situations]
        quiet += [render(text) for text in _part(splits, "quiet", part)]
    return ContrastPrompts(fire, quiet)


def quiet_sets(splits: dict[str, datasets.Splits[str]], part: str, count: int) -> tuple[str, ...]:
    """The set of each of the ``count`` quiet prompts of split ``part`` (:func:`gate_prompts`'s,
    then any played scenes'): "requests" for the ordinary requests (the negative set's, with
    ``data.gate_harmless``), "situations" for the rest (``data.gate_quiet``'s situations without
    a trigger: as written, as scenes, played). ``--calibrate each-set`` holds the target on each
    apart: hundreds of easy requests would otherwise let the gate fire on many of the few
    situations that look most like the ones it fires on."""
    requests = len(getattr(splits["negative"], part))
    return ("requests",) * requests + ("situations",) * (count - requests)


def gate_origins(
    splits: dict[str, datasets.Splits[str]], part: str, forms: int = 0
) -> ContrastPrompts:
    """The text each prompt of :func:`gate_prompts` (with ``forms`` scene renderers) was made
    from, in its order: the prompt itself, or for a situation rendered as a scene, the
    situation (what :func:`~steer.directions.gate_styles.source_labels` labels it by)."""
    return gate_prompts(splits, part, (str,) * forms)


def _part(splits: dict[str, datasets.Splits[str]], name: str, part: str) -> tuple[str, ...]:
    """Split ``part`` of the set ``name``, or nothing where the recipe has no such set."""
    return getattr(splits[name], part) if name in splits else ()


def check_scenes(recipe: DirectionRecipe) -> None:
    """Raise what ``data.gate_scenes`` would raise about a situation that is not
    "You are WHO. EVENT", without a model."""
    splits = gate_splits(recipe)
    for name in ("positive", "fire", "quiet"):
        if name in splits:
            for part in ("train", "validation", "test"):
                for text in getattr(splits[name], part):
                    situation_scene(text, field="data.gate_scenes")


#: how ``steer directions gate`` keeps one of its candidates: the one that separates the
#: validation prompts best, or the one that separates each source's prompts best when fitted and
#: calibrated without that source (:func:`source_labels`, pooled over the sources)
CHOICES = ("validation", "new-source")

#: how ``steer directions gate`` sets a candidate's threshold: the lowest whose false-positive
#: rate on the train prompts is at most the target; or that, raised until the rate on each
#: source's prompts, the gate fitted without that source, pooled, is too
#: (:func:`new_source_levels`); or the lowest whose rate on each quiet set's train prompts
#: apart is (:func:`quiet_sets`)
CALIBRATIONS = ("train", "new-source", "each-set")


@dataclass(frozen=True)
class GateCandidate:
    """One candidate gate: its condition, the vector it reads, its calibration, and (where the
    recipe's prompts have sources, :func:`source_labels`) its rates on each source when fitted
    without it."""

    condition: str
    vector: SteeringVector | torch.Tensor
    calibration: GateCalibration
    new_source: StyleRates | None = None

    def as_dict(self) -> dict[str, Any]:
        new_source = None if self.new_source is None else asdict(self.new_source)
        return {**asdict(self.calibration), "condition": self.condition, "new_source": new_source}


@dataclass(frozen=True)
class GateChoice:
    """The kept gate (``calibration``, of ``condition``, read along ``vector``) and every
    candidate (each condition at each hook); ``new_source``: the kept gate fitted without each
    source in turn (:func:`source_labels`), its rates on the held-out one (an estimate for
    requests written unlike every train prompt; None where the prompts have no sources)."""

    condition: str
    vector: SteeringVector | torch.Tensor
    calibration: GateCalibration
    candidates: tuple[GateCandidate, ...]
    new_source: StyleRates | None = None
    #: how the kept one was chosen (:data:`CHOICES`)
    choose: str = "validation"
    #: how each candidate's threshold was set (:data:`CALIBRATIONS`)
    calibrate: str = "train"

    def as_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "choose": self.choose,
            "calibrate": self.calibrate,
            "kept": asdict(self.calibration),
            "candidates": [c.as_dict() for c in self.candidates],
            "new_source": None if self.new_source is None else asdict(self.new_source),
        }


def choose_gate(
    handle: ModelHandle,
    direction: SteeringVector,
    recipe: DirectionRecipe,
    *,
    hooks: Sequence[str],
    condition: str | Sequence[str] = "direction",
    target_fpr: float = 0.02,
    summed: bool = False,
    batch_size: int = 16,
    reply_tokens: int = 0,
    reply_aggregate: str = "any",
    choose: str = "validation",
    calibrate: str = "train",
) -> GateChoice:
    """Calibrate a prompt-scope gate of each ``condition`` at each of ``hooks`` on train (with
    ``summed``, also one reading all of them: :func:`steer.calibration.summed_scores`); keep the
    one ``choose`` prefers (:data:`CHOICES`; see the module docstring). Where the recipe's
    prompts have sources (:func:`source_labels`), each candidate's rates on each source when
    fitted without it. With ``reply_tokens`` K, a reply-scope gate reading each prompt's first K
    greedy reply tokens, combined by ``reply_aggregate`` (:data:`steer.gates.REPLY_AGGREGATES`).
    With ``calibrate="new-source"`` each threshold is raised until the gate's false-positive
    rate on held-out sources is at most ``target_fpr`` (:func:`new_source_levels`); with
    "each-set" the train rate is at most ``target_fpr`` on each quiet set apart
    (:func:`quiet_sets`). :func:`gate_reads` then :func:`choose_from`: several calibrations of
    one read call those two."""
    conditions = (condition,) if isinstance(condition, str) else tuple(condition)
    check_choice(choose, conditions, recipe, calibrate)
    reads, labels = gate_reads(
        handle, recipe, hooks, batch_size=batch_size, reply_tokens=reply_tokens,
        aggregate=reply_aggregate,
    )  # fmt: skip
    return choose_from(
        reads, labels, direction, conditions=conditions, target_fpr=target_fpr, summed=summed,
        choose=choose, calibrate=calibrate,
    )  # fmt: skip


def choose_from(
    reads: PromptReads,
    labels: dict[str, list[str]] | None,
    direction: SteeringVector,
    *,
    conditions: Sequence[str],
    target_fpr: float,
    summed: bool = False,
    choose: str = "validation",
    calibrate: str = "train",
) -> GateChoice:
    """:func:`choose_gate` on prompts already read (:func:`gate_reads`; checked by
    :func:`check_choice`)."""
    candidates = [
        candidate
        for name in conditions
        for candidate in _candidates(
            reads,
            labels,
            name,
            direction,
            target_fpr=target_fpr,
            summed=summed,
            calibrate=calibrate,
        )
    ]
    if "new-source" in (choose, calibrate) and any(c.new_source is None for c in candidates):
        field = "choose" if choose == "new-source" else "calibrate"
        raise InvalidArgumentError(
            "a source of the recipe's prompts is too small to fit a gate without it", field=field
        )
    kept = max(candidates, key=lambda candidate: _separation(candidate, choose))
    return GateChoice(
        kept.condition,
        kept.vector,
        kept.calibration,
        tuple(candidates),
        kept.new_source,
        choose,
        calibrate,
    )


def gate_reads(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    hooks: Sequence[str],
    *,
    scenes: bool | None = None,
    batch_size: int = 16,
    reply_tokens: int = 0,
    aggregate: str = "any",
    known: KnownReads | None = None,
) -> tuple[PromptReads, dict[str, list[str]] | None]:
    """The gate's train and validation prompts (:func:`gate_prompts`: with ``scenes``, default
    the recipe's data.gate_scenes, the situations also as RP scenes; then the recipe's played
    scenes) read at ``hooks`` in one pass under the recipe's system prompt (a prompt-scope
    gate takes the prompts ``known`` holds from there), with each quiet prompt's set
    (:func:`quiet_sets`) and each prompt's source (:func:`source_labels`)."""
    splits = gate_splits(recipe)
    played = recipe.data.gate_scenes if scenes is None else scenes
    rendered = scene_prompts(handle) if played else ()
    parts = {part: gate_prompts(splits, part, rendered) for part in ("train", "validation")}
    parts = with_scenarios(handle, recipe, parts, SCENE_FORMS)
    reads = read_prompts(
        handle,
        hooks,
        train=parts["train"],
        validation=parts["validation"],
        system=recipe.data.system or None,
        batch_size=batch_size,
        reply_tokens=reply_tokens,
        reply_aggregate=aggregate,
        known=known,
    )
    sets = {f"{part}.quiet": quiet_sets(splits, part, len(parts[part].quiet)) for part in parts}
    origins = {part: gate_origins(splits, part, len(rendered)) for part in parts}
    forms = SCENE_FORMS if played else ()
    shapes = {
        f"{part}.{side}": prompt_forms(splits, part, side, forms, len(getattr(parts[part], side)))
        for part in parts
        for side in ("fire", "quiet")
    }
    return replace(reads, quiet_sets=sets, forms=shapes), source_labels(recipe, parts, origins)


def prompt_forms(
    splits: dict[str, datasets.Splits[str]],
    part: str,
    side: str,
    forms: Sequence[str],
    count: int,
) -> tuple[str, ...]:
    """The form of each of the ``count`` prompts on ``side`` ("fire", "quiet") of split
    ``part``, in :func:`gate_prompts`'s order: "message" for the prompts as written, then each
    of ``forms`` for the situations rendered in it, then "played" for any played scene."""
    plain = getattr(gate_prompts(splits, part), side)
    rendered = len(plain) if side == "fire" else len(_part(splits, "quiet", part))
    labels = ["message"] * len(plain) + [form for form in forms for _ in range(rendered)]
    return tuple(labels + ["played"] * (count - len(labels)))


def _candidates(
    reads: PromptReads,
    labels: dict[str, list[str]] | None,
    condition: str,
    direction: SteeringVector,
    *,
    target_fpr: float,
    summed: bool,
    calibrate: str,
) -> list[GateCandidate]:
    """The candidate gates of ``condition``: one at each hook of ``reads`` (with ``summed``, then
    one reading them all), each calibrated as ``calibrate`` says, with its held-out sources'
    rates where ``labels`` gives sources (:func:`candidate_rates`)."""
    vector, scores = reads.gate(condition, direction)
    if summed and len(scores) > 1:
        scores.append(summed_scores(scores))
    floors = (
        [train_level(score, target_fpr) for score in scores] if calibrate == "new-source" else None
    )
    styles = candidate_rates(
        reads,
        labels,
        condition,
        direction,
        target_fpr=target_fpr,
        summed=summed,
        calibrate=calibrate,
        floors=floors,
    )
    return [
        GateCandidate(condition, vector, _calibrated(score, target_fpr, style, calibrate), style)
        for score, style in zip(scores, styles, strict=True)
    ]


def _calibrated(
    score: GateScores, target_fpr: float, rates: StyleRates | None, calibrate: str
) -> GateCalibration:
    """``score``'s gate calibrated on train at ``target_fpr``: with ``calibrate="each-set"`` on
    each quiet set apart (:func:`quiet_sets`); with "new-source", its threshold raised to
    ``rates.level`` standard deviations above the mean of its quiet train scores
    (:func:`new_source_levels`, which never puts it below the train threshold)."""
    calibration = score.calibrate(target_fpr, each_set=calibrate == "each-set")
    if calibrate != "new-source" or rates is None or rates.level is None:
        return calibration
    mean, spread = score.spread()
    trained = -calibration.threshold if calibration.below else calibration.threshold
    return score.at(max(trained, mean + rates.level * spread), calibration.target_fpr)


def check_choice(
    choose: str, conditions: Sequence[str], recipe: DirectionRecipe, calibrate: str = "train"
) -> None:
    """Raise, before any prompt is read, for an unknown ``choose``, ``calibrate`` or condition,
    or "new-source" for a recipe whose prompts have no sources."""
    for index, name in enumerate(conditions):
        if name not in CONDITIONS:
            field = "condition" if len(conditions) == 1 else f"condition[{index}]"
            raise InvalidArgumentError(
                f"unknown condition {name!r}; use one of {', '.join(CONDITIONS)}", field=field
            )
    if not conditions:
        raise InvalidArgumentError("needs at least one condition", field="condition")
    if choose not in CHOICES:
        raise InvalidArgumentError(
            f"unknown choice {choose!r}; use one of {', '.join(CHOICES)}", field="choose"
        )
    if calibrate not in CALIBRATIONS:
        raise InvalidArgumentError(
            f"unknown calibration {calibrate!r}; use one of {', '.join(CALIBRATIONS)}",
            field="calibrate",
        )
    for field, value in (("choose", choose), ("calibrate", calibrate)):
        if value == "new-source" and not has_sources(recipe):
            raise InvalidArgumentError(
                f"{field} new-source needs prompts from several sources: data.positive_extra "
                "and data.negative_extra, or data.gate_fire and data.gate_quiet naming as many "
                "files each (two or more)",
                field=field,
            )


def _separation(candidate: GateCandidate, choose: str) -> tuple[float, float]:
    """How well ``candidate`` separates what ``choose`` reads: TPR - FPR, then the lower FPR."""
    rates = candidate.calibration.validation if choose == "validation" else candidate.new_source
    assert rates is not None  # choose_gate checks
    return (rates.true_positive_rate - rates.false_positive_rate, -rates.false_positive_rate)
