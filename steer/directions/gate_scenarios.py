"""Played RP scenes as a gate's calibration data (a recipe's ``data.gate_scenarios``).

``data.gate_scenes`` renders each one-message situation as a one-turn scene: a short card, an
opening line and the event. In a played scene the prompt's last token follows a card, several
turns and the model's own replies, and a moralizing gate fitted without such prompts fired on
many turns of long scenes without a trigger (docs/results.md "gated-rp-unseen-every-set").
With ``data.gate_scenarios`` (scenario files of ``steer eval rp``), each scene is played
unedited for :data:`ROUNDS` replies, as ``steer eval rp`` plays it, and the prompt of every
reply, in each of the gate's scene forms (:data:`steer.directions.scene_forms.SCENE_FORMS`), joins
the gate's data: a scene tagged with one of :data:`TRIGGER_TAGS` on the side the gate fires
on, any other on the side it stays quiet on. Scenes, not prompts, are split into train /
validation / test with the recipe's seed and shares (each file and side apart, joined in
order), so the turns of one scene never straddle two splits; only train and validation are
played.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from steer.calibration import ContrastPrompts, Prompt
from steer.directions import data as datasets
from steer.directions.recipe import DirectionRecipe
from steer.directions.scene_forms import scene_tokens
from steer.models import ModelHandle
from steer.rp.evaluate import EvalSettings, Scenario, load_scenarios, play, played_turns
from steer.rp.presets import load_preset

#: a scene with one of these tags carries a moralizing trigger (scripts/eval_gated_rp.py's
#: --skip-tags default: crime, villain, horror, dark comedy)
TRIGGER_TAGS = ("crime", "villain", "horror", "dark comedy")
#: replies played per scene, tokens per reply and the sampler, as scripts/eval_gated_rp.py
#: plays scenes by default
ROUNDS = 2
MAX_NEW_TOKENS = 64
PRESET = "near-greedy"

__all__ = [
    "MAX_NEW_TOKENS",
    "PRESET",
    "ROUNDS",
    "TRIGGER_TAGS",
    "played_prompts",
    "scenario_splits",
    "with_scenarios",
]


def scenario_splits(recipe: DirectionRecipe) -> dict[str, datasets.Splits[Scenario]]:
    """``{"fire": Splits, "quiet": Splits}`` of the scenes of ``recipe``'s
    ``data.gate_scenarios`` (empty splits without it)."""
    data = recipe.data
    sides: dict[str, list[datasets.Splits[Scenario]]] = {"fire": [], "quiet": []}
    files = data.gate_scenarios
    for index, source in enumerate(files):
        field = datasets.list_field("gate_scenarios", index, len(files))
        scenes = load_scenarios(datasets.resolve_source(source, field=field, base=recipe.base))
        for side, fires in (("fire", True), ("quiet", False)):
            chosen = [s for s in scenes if bool(set(TRIGGER_TAGS).intersection(s.tags)) == fires]
            sides[side].append(
                datasets.split(chosen, seed=data.seed, train=data.train, validation=data.validation)
            )
    return {
        side: datasets.Splits(
            *(
                tuple(s for split in splits for s in getattr(split, part))
                for part in ("train", "validation", "test")
            )
        )
        for side, splits in sides.items()
    }


def played_prompts(
    handle: ModelHandle, scenarios: Sequence[Scenario], forms: Sequence[str]
) -> list[Prompt]:
    """The token ids of the prompt of every reply of ``scenarios`` played unedited
    (:data:`ROUNDS` replies, :data:`PRESET`), scene by scene and reply by reply, in each of
    ``forms``."""
    if not scenarios:
        return []
    settings = EvalSettings(
        sampling=replace(load_preset(PRESET), seed=None),
        max_new_tokens=MAX_NEW_TOKENS,
        rounds=ROUNDS,
    )
    prompts: list[Prompt] = []
    for scenario, transcript in zip(scenarios, play(handle, scenarios, settings), strict=True):
        for scene, speaker in played_turns(scenario, transcript.replies):
            prompts += [scene_tokens(handle, scene, form, speaker) for form in forms]
    return prompts


def with_scenarios(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    parts: dict[str, ContrastPrompts],
    forms: Sequence[str],
) -> dict[str, ContrastPrompts]:
    """``parts`` (split name -> the gate's prompts) with the prompts of ``recipe``'s
    ``data.gate_scenarios`` played (:func:`played_prompts`) after each side's own. Each side
    of each split is played on its own: a scene's sampling seed follows its place in the list
    played (:func:`steer.rp.evaluate.play`), so one list of all of them would give other
    replies than the gates already recorded were fitted on."""
    if not recipe.data.gate_scenarios:
        return parts
    splits = scenario_splits(recipe)
    joined = {}
    for part, prompts in parts.items():
        fire = played_prompts(handle, getattr(splits["fire"], part), forms)
        quiet = played_prompts(handle, getattr(splits["quiet"], part), forms)
        joined[part] = ContrastPrompts([*prompts.fire, *fire], [*prompts.quiet, *quiet])
    return joined
