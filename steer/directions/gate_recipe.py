"""The edit recipe steer directions gate writes: direction artifacts ablated behind a gate.

The recipe holds the edit, the gate, and the gate's calibration figures in its description;
:func:`ablation_recipe` also gives the plain (ungated) ablation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.artifacts import save_vector
from steer.calibration import GateCalibration
from steer.directions.gate_styles import StyleRates
from steer.errors import InvalidArgumentError
from steer.gates import GateScope
from steer.models import ModelHandle
from steer.recipes import AblateEdit, AddEdit, EditGate, EditRecipe, recipe_to_toml
from steer.vectors import SteeringVector

__all__ = ["SaeFeature", "ablation_recipe", "check_push", "gated_ablation_recipe"]


@dataclass(frozen=True)
class SaeFeature:
    """A gate's condition on an SAE feature: the SAE's directory and the feature's index."""

    path: Path
    feature: int


def gated_ablation_recipe(
    out: Path,
    direction: Path | Sequence[Path],
    condition: SteeringVector | torch.Tensor | Path | SaeFeature,
    calibration: GateCalibration,
    *,
    weight: float = 1.0,
    push: float = 0.0,
    handle: ModelHandle | None = None,
    new_source: StyleRates | None = None,
    each_set: bool = False,
) -> Path:
    """Write ``out/gated.toml``: the artifact at ``direction`` (or each of several) ablated at
    every layer (and pushed against, with ``push``; see :func:`ablation_recipe`), only for
    prompts the gate fires on. ``condition`` is the gate's artifact, a vector saved to
    ``out/condition`` (with ``handle``), or an SAE feature (:class:`SaeFeature`);
    ``new_source`` (:attr:`GateChoice.new_source`, with its level where the threshold was
    calibrated on new sources) joins the calibration figures in
    the recipe's description, as does ``each_set`` (the threshold kept the target on each quiet
    set apart, :func:`steer.directions.gating.quiet_sets`). Returns the recipe's path."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(condition, torch.Tensor):
        condition = SteeringVector.from_shared(condition)
    if isinstance(condition, SteeringVector):
        if handle is None:
            raise InvalidArgumentError("saving a condition vector needs the model", field="handle")
        condition = save_vector(out / "condition", condition, handle=handle)
    gate = _edit_gate(condition, calibration)
    description = _gated_description(calibration, len(_paths(direction)), push, new_source)
    if gate.feature is not None:
        description += (
            f" The gate reads feature {gate.feature} of the SAE at {gate.sae} (its activation "
            f"at {calibration.hook})."
        )
    if each_set:
        description += (
            " The train false-positive rate was held at the target on each quiet set apart "
            "(ordinary requests; situations without a trigger), not only on them all together."
        )
    if new_source is not None and new_source.level is not None:
        description += (
            f" The threshold was raised to {new_source.level:.3f} standard deviations above the "
            "mean of the quiet train scores: the lowest such level, and no lower than the train "
            "threshold, at which the gates fitted without each source fire on at most the target "
            "of the held-out sources' quiet prompts (the held-out figures above are at that "
            "level, chosen on them)."
        )
    recipe = ablation_recipe(direction, weight, push=push, gate=gate, description=description)
    path = out / "gated.toml"
    path.write_text(recipe_to_toml(recipe))
    return path


def _edit_gate(condition: Path | SaeFeature, calibration: GateCalibration) -> EditGate:
    """The recipe gate of a calibrated condition: a saved direction's projection at the
    calibrated hook(s), or an SAE feature's activation at the SAE's hook."""
    hook: str | tuple[str, ...]
    if isinstance(condition, SaeFeature):
        hook, artifact = "", ""
        sae, feature = str(condition.path.resolve()), condition.feature
    else:
        hook, artifact = calibration.hook, str(Path(condition).resolve())
        sae, feature = None, None
    return EditGate(
        hook=hook,
        direction=artifact,
        sae=sae,
        feature=feature,
        threshold=calibration.threshold,
        below=calibration.below,
        scope=GateScope.REPLY if calibration.reply_tokens else GateScope.PROMPT,
        weights=calibration.weights,
        reply_tokens=calibration.reply_tokens or None,
        reply_aggregate=calibration.reply_aggregate if calibration.reply_tokens else None,
    )


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
