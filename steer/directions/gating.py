"""A gated ablation recipe from a direction, its gate calibrated on train (steer directions gate).

The gate is calibrated on the recipe's train split, reported on validation and written with the
edit as an edit recipe.

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
its false-positive rate there is several times the target (docs/results.md "gate-styles").

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

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import save_vector
from steer.calibration import (
    CONDITIONS,
    ContrastPrompts,
    GateCalibration,
    Prompt,
    PromptReads,
    read_prompts,
    summed_scores,
)
from steer.directions import data as datasets
from steer.directions.api import contrast_splits
from steer.directions.data import RECIPES_DIR
from steer.directions.gate_styles import StyleRates, held_out_styles
from steer.directions.recipe import (
    GATE_SETS,
    DirectionRecipe,
    RecipeKind,
    load_direction_recipe,
)
from steer.errors import InvalidArgumentError
from steer.gates import GateScope
from steer.models import ModelHandle
from steer.recipes import AblateEdit, AddEdit, EditGate, EditRecipe, recipe_to_toml
from steer.rp.evaluate import reply_prompt
from steer.rp.scene import Scene, situation_scene
from steer.vectors import SteeringVector

__all__ = [
    "CONDITIONS",
    "SCENE_FORMS",
    "SCENE_OPENERS",
    "GateChoice",
    "ablation_recipe",
    "check_push",
    "check_scenes",
    "choose_gate",
    "gate_prompts",
    "gate_splits",
    "gated_ablation_recipe",
    "new_source_rates",
    "quiet_prompts",
    "scene_prompt",
    "scene_prompts",
    "source_labels",
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


def _part(splits: dict[str, datasets.Splits[str]], name: str, part: str) -> tuple[str, ...]:
    """Split ``part`` of the set ``name``, or nothing where the recipe has no such set."""
    return getattr(splits[name], part) if name in splits else ()


#: the character's line before the user's turn in a situation's scene (one per situation, by a
#: hash of its text): a played scene always has history before the reply, and without it the
#: scenes sat further from real ones (written for steer)
SCENE_OPENERS = (
    '*looks up* "Yes? What is it?"',
    '"You again. Go on, then."',
    '*sets down what they were holding* "I\'m listening."',
    '"Well, don\'t just stand there."',
    '*nods* "Speak."',
    '"Ah. I wondered when you\'d come."',
)


#: the forms a situation is played in for ``data.gate_scenes``: "scene", as ``steer eval rp``,
#: gRPC scene requests and named (group) chat requests render it, the prompt ending in the
#: character's name; "chat", a chat-completion request without names (SillyTavern's Chat
#: Completion by default), the prompt ending at the chat template's assistant header
SCENE_FORMS = ("scene", "chat")


def scene_prompt(handle: ModelHandle, form: str = "scene") -> Callable[[str], Prompt]:
    """situation -> the token ids of the prompt :func:`steer.rp.evaluate.play` sends for the
    character's reply in its scene (:func:`steer.rp.scene.situation_scene`, opened by one of
    :data:`SCENE_OPENERS`): with ``form`` "scene", in the ``chat_template`` format; with
    "chat", in ``chat_completion`` (no names), under a system prompt asking for the
    character's next reply, as a chat-completion front end sends it."""
    if form not in SCENE_FORMS:
        raise InvalidArgumentError(
            f"unknown scene form {form!r}; use one of {', '.join(SCENE_FORMS)}", field="form"
        )

    def render(text: str) -> Prompt:
        opener = SCENE_OPENERS[zlib.crc32(text.encode()) % len(SCENE_OPENERS)]
        return scene_tokens(
            handle, situation_scene(text, opener=opener, field="data.gate_scenes"), form
        )

    return render


def scene_tokens(
    handle: ModelHandle, scene: Scene, form: str, speaker: str | None = None
) -> Prompt:
    """The token ids of the prompt for ``speaker``'s (default: the first character's) next
    reply in ``scene``, in scene form ``form`` (:data:`SCENE_FORMS`)."""
    speaker = scene.names[0] if speaker is None else speaker
    if form == "chat":
        main = f"Write {speaker}'s next reply in this roleplay with {scene.user.name}."
        _, tokens = reply_prompt(
            handle, replace(scene, system=main), speaker, format="chat_completion"
        )
    else:
        _, tokens = reply_prompt(handle, scene, speaker)
    return tokens.ids


def scene_prompts(handle: ModelHandle) -> tuple[Callable[[str], Prompt], ...]:
    """:func:`scene_prompt` in each of :data:`SCENE_FORMS`."""
    return tuple(scene_prompt(handle, form) for form in SCENE_FORMS)


def check_scenes(recipe: DirectionRecipe) -> None:
    """Raise what ``data.gate_scenes`` would raise about a situation that is not
    "You are WHO. EVENT", without a model."""
    splits = gate_splits(recipe)
    for name in ("positive", "fire", "quiet"):
        if name in splits:
            for part in ("train", "validation", "test"):
                for text in getattr(splits[name], part):
                    situation_scene(text, field="data.gate_scenes")


@dataclass(frozen=True)
class GateChoice:
    """The kept gate (``calibration``, read along ``vector``) and every hook's candidate; with
    the recipe's extras, ``new_source``: the kept hook's gate fitted without each source in turn
    (:func:`source_labels`), its rates on the held-out one (an estimate for requests written
    unlike every train prompt; None for a gate over several hooks)."""

    condition: str
    vector: SteeringVector | torch.Tensor
    calibration: GateCalibration
    candidates: tuple[GateCalibration, ...]
    new_source: StyleRates | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "kept": asdict(self.calibration),
            "candidates": [asdict(c) for c in self.candidates],
            "new_source": None if self.new_source is None else asdict(self.new_source),
        }


def choose_gate(
    handle: ModelHandle,
    direction: SteeringVector,
    recipe: DirectionRecipe,
    *,
    hooks: Sequence[str],
    condition: str = "direction",
    target_fpr: float = 0.02,
    summed: bool = False,
    batch_size: int = 16,
    reply_tokens: int = 0,
    reply_aggregate: str = "any",
) -> GateChoice:
    """Calibrate a prompt-scope gate at each of ``hooks`` on train (with ``summed``, also one
    reading all of them: :func:`steer.calibration.summed_scores`); keep the one that separates
    validation best (see the module docstring). With the recipe's extras, also the kept gate's
    rates on each source when fitted without it (:attr:`GateChoice.new_source`). With
    ``reply_tokens`` K, a reply-scope gate reading each prompt's first K greedy reply tokens,
    combined by ``reply_aggregate`` (:data:`steer.gates.REPLY_AGGREGATES`)."""
    from steer.directions.gate_scenarios import with_scenarios

    splits = gate_splits(recipe)
    scenes = scene_prompts(handle) if recipe.data.gate_scenes else ()
    parts = {part: gate_prompts(splits, part, scenes) for part in ("train", "validation")}
    parts = with_scenarios(handle, recipe, parts, SCENE_FORMS)
    reads = read_prompts(
        handle,
        hooks,
        train=parts["train"],
        validation=parts["validation"],
        system=recipe.data.system or None,
        batch_size=batch_size,
        reply_tokens=reply_tokens,
        reply_aggregate=reply_aggregate,
    )
    vector, scores = reads.gate(condition, direction)
    if summed and len(scores) > 1:
        scores.append(summed_scores(scores))
    candidates = tuple(score.calibrate(target_fpr) for score in scores)
    kept = max(candidates, key=_separation)
    new_source = new_source_rates(reads, source_labels(recipe, parts), condition, direction, kept)
    return GateChoice(condition, vector, kept, candidates, new_source)


def new_source_rates(
    reads: PromptReads,
    labels: dict[str, list[str]] | None,
    condition: str,
    direction: SteeringVector | torch.Tensor,
    kept: GateCalibration,
) -> StyleRates | None:
    """The gate ``kept`` (of ``condition``, calibrated on ``reads``) fitted and calibrated
    without each source of ``labels`` (:func:`source_labels`) in turn, read on it; None without
    labels, for a gate over several hooks, or where a source is too small to fit one without the
    other."""
    if labels is None or not isinstance(kept.hook, str):
        return None
    # the kept hook's reads alone: the gate is fitted there only
    point = next(point for point in reads.points if point.name == kept.hook)
    only = PromptReads(
        (point,), {key: {point.name: rows[point.name]} for key, rows in reads.read.items()}
    )
    try:
        [rates] = held_out_styles(only, labels, condition, direction, target_fpr=kept.target_fpr)
    except InvalidArgumentError:
        return None
    return rates


def source_labels(
    recipe: DirectionRecipe, prompts: dict[str, ContrastPrompts]
) -> dict[str, list[str]] | None:
    """Each prompt's source, for :func:`steer.directions.gate_styles.held_out_styles`, keyed as
    :class:`~steer.calibration.PromptReads` keys its reads ("train.fire", ...; ``prompts`` by
    split): "own sets" for one of the recipe's positive / negative sets; for its
    ``data.positive_extra`` / ``negative_extra``, "extras" where each names one set, else the
    i-th set of each side together as one source, named by their files; "" for any other
    (gate_fire, gate_quiet, gate_harmless, scenes: never held out). None unless the recipe has
    both extras."""
    data = recipe.data
    if recipe.kind is RecipeKind.PAIRS or not (data.positive_extra and data.negative_extra):
        return None
    names = ("positive_extra", "negative_extra")
    paths = [getattr(data, name) for name in names]
    single = all(len(side) == 1 for side in paths)

    def source_name(index: int) -> str:
        files = [
            Path(side[index].removeprefix("recipes:")).name for side in paths if index < len(side)
        ]
        return "extras" if single else " + ".join(files)

    source: dict[str, str] = {}
    for name in names:
        for index, texts in enumerate(datasets.extra_sets(recipe, name)):
            source |= dict.fromkeys(texts, source_name(index))
    sets = datasets.contrast_sets(recipe)
    own = {*sets["positive"], *sets["negative"]} - source.keys()

    def label(prompt: Prompt) -> str:
        if not isinstance(prompt, str):
            return ""
        return source.get(prompt) or ("own sets" if prompt in own else "")

    return {
        f"{part}.{side}": [label(prompt) for prompt in getattr(split, side)]
        for part, split in prompts.items()
        for side in ("fire", "quiet")
    }


def _separation(calibration: GateCalibration) -> tuple[float, float]:
    rates = calibration.validation
    return (
        rates.true_positive_rate - rates.false_positive_rate,
        -rates.false_positive_rate,
    )


def gated_ablation_recipe(
    out: Path,
    direction: Path | Sequence[Path],
    condition: SteeringVector | torch.Tensor | Path,
    calibration: GateCalibration,
    *,
    weight: float = 1.0,
    push: float = 0.0,
    handle: ModelHandle | None = None,
    new_source: StyleRates | None = None,
) -> Path:
    """Write ``out/gated.toml``: the artifact at ``direction`` (or each of several) ablated at
    every layer (and pushed against, with ``push``; see :func:`ablation_recipe`), only for
    prompts the gate fires on. ``condition`` is the gate's artifact, or a vector saved to
    ``out/condition`` (with ``handle``); ``new_source`` (:attr:`GateChoice.new_source`) joins the
    calibration figures in the recipe's description. Returns the recipe's path."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(condition, torch.Tensor):
        condition = SteeringVector.from_shared(condition)
    if isinstance(condition, SteeringVector):
        if handle is None:
            raise InvalidArgumentError("saving a condition vector needs the model", field="handle")
        condition = save_vector(out / "condition", condition, handle=handle)
    gate = EditGate(
        hook=calibration.hook,
        direction=str(Path(condition).resolve()),
        threshold=calibration.threshold,
        below=calibration.below,
        scope=GateScope.REPLY if calibration.reply_tokens else GateScope.PROMPT,
        weights=calibration.weights,
        reply_tokens=calibration.reply_tokens or None,
        reply_aggregate=calibration.reply_aggregate if calibration.reply_tokens else None,
    )
    description = _gated_description(calibration, len(_paths(direction)), push, new_source)
    recipe = ablation_recipe(direction, weight, push=push, gate=gate, description=description)
    path = out / "gated.toml"
    path.write_text(recipe_to_toml(recipe))
    return path


def _gated_description(
    calibration: GateCalibration, directions: int, push: float, new_source: StyleRates | None
) -> str:
    """A gated ablation recipe's description: what it ablates, where the gate fires, and the
    calibration's figures."""
    train, validation = calibration.train, calibration.validation
    what = "The directions" if directions > 1 else "The direction"
    pushed = f", the first also subtracted at its hook at strength {push:g}," if push else ""
    fires_on = "prompts"
    if calibration.reply_tokens:
        fires_on = f"replies whose first {calibration.reply_tokens} tokens (drawn without it)"
        if calibration.reply_aggregate == "mean":
            fires_on += ", on their mean,"
    description = (
        f"{what} ablated at every layer{pushed} only for {fires_on} the gate fires on. Threshold "
        f"from train prompts (false-positive rate <= {calibration.target_fpr}: "
        f"{train.false_positive_rate:.3f} of {train.quiet_count}, fires on "
        f"{train.true_positive_rate:.3f} of {train.fire_count}); validation: fires on "
        f"{validation.true_positive_rate:.3f} of {validation.fire_count} prompts it should "
        f"fire on and {validation.false_positive_rate:.3f} of {validation.quiet_count} it "
        f"should not."
    )
    if new_source is not None:
        description += (
            f" Fitted without each source of prompts in turn ({', '.join(new_source.by_style)}), "
            f"on the held-out one: fires on {new_source.true_positive_rate:.3f} of "
            f"{new_source.fire_count} and {new_source.false_positive_rate:.3f} of "
            f"{new_source.quiet_count} (what requests written unlike every train prompt may see)."
        )
    return description


def ablation_recipe(
    direction: Path | Sequence[Path],
    weight: float = 1.0,
    *,
    push: float = 0.0,
    gate: EditGate | None = None,
    description: str = "",
) -> EditRecipe:
    """The artifact at ``direction`` (or each of several) ablated at every layer (the weight
    form ``steer bake`` writes), behind ``gate`` if given. With ``push``, the first direction
    is also subtracted at its own hook (activation addition at strength ``-push``, behind the
    same gate): the ablated model's writers no longer write along it, so what the push leaves
    in the residual stream stays there for every later layer."""
    directions = _paths(direction)
    if not directions:
        raise InvalidArgumentError("no direction to ablate", field="direction")
    check_push(push)
    edits: tuple[AblateEdit | AddEdit, ...] = tuple(
        AblateEdit(direction=str(path.resolve()), weight=weight, gate=gate) for path in directions
    )
    if push:
        edits += (AddEdit(vector=str(directions[0].resolve()), strength=-push, gate=gate),)
    name = "ablation" if gate is None else "gated-ablation"
    return EditRecipe(edits=edits, name=name, description=description)


def check_push(push: float) -> None:
    """Raise what :func:`ablation_recipe` raises about ``push`` (before a model loads)."""
    if not math.isfinite(push):
        raise InvalidArgumentError(f"push must be a finite number, got {push}", field="push")


def _paths(direction: Path | Sequence[Path]) -> list[Path]:
    return [direction] if isinstance(direction, Path) else list(direction)
