"""Calibrating a gate's threshold on contrast prompts: train chooses it, validation reports it.

:func:`calibrate_gate` reads the projection a prompt-scope gate decides on -- the residual at the
condition's hook, at the chat prompt's last token (the post-instruction position), onto the unit
direction -- for prompts the gate should fire on and prompts it should not. On the train split it
chooses the lowest threshold whose false-positive rate on the "should not fire" prompts is at most
``target_fpr``; on the validation split it measures the true- and false-positive rates that
threshold gives. It takes no test split: what a test split measures is chosen without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.activations import forward
from steer.errors import InvalidArgumentError, SteerError
from steer.gates import Condition
from steer.models import ModelHandle
from steer.text import encode_chat
from steer.vectors import SteeringVector

__all__ = ["ContrastPrompts", "GateCalibration", "SplitRates", "calibrate_gate"]


@dataclass(frozen=True)
class ContrastPrompts:
    """One split of user prompts: those a gate should fire on, those it should not."""

    fire: Sequence[str]
    quiet: Sequence[str]


@dataclass(frozen=True)
class SplitRates:
    """What a threshold does on one split."""

    true_positive_rate: float  # fraction of ``fire`` prompts it fires on
    false_positive_rate: float  # fraction of ``quiet`` prompts it fires on
    fire_count: int
    quiet_count: int


@dataclass(frozen=True)
class GateCalibration:
    """A calibrated threshold for a condition at ``hook``, with the figures it was chosen by."""

    hook: str
    threshold: float
    below: bool
    target_fpr: float
    train: SplitRates
    validation: SplitRates

    def condition(self, direction: SteeringVector | torch.Tensor) -> Condition:
        """The gate's condition (``direction`` must be the one calibrated with)."""
        return Condition(self.hook, direction, self.threshold, self.below)


def calibrate_gate(
    handle: ModelHandle,
    hook: str,
    direction: SteeringVector | torch.Tensor,
    *,
    train: ContrastPrompts,
    validation: ContrastPrompts,
    target_fpr: float = 0.05,
    below: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> GateCalibration:
    """Choose a prompt-scope gate's threshold on ``train``; report its rates on ``validation``.

    The gate fires where the projection is above the threshold (below it with ``below``).
    """
    target_fpr = _target(target_fpr)
    point = handle.resolver.parse(hook, field="hook")
    try:
        unit = Condition(hook, direction, 0.0).unit(point, handle.d_model)
    except SteerError as error:
        raise InvalidArgumentError(error.message, field="direction") from None
    sign = -1.0 if below else 1.0  # "below t" is "above -t" on the negated projections
    read = {
        f"{name}.{side}": [
            sign * p
            for p in _projections(handle, hook, unit, prompts, f"{name}.{side}", system, batch_size)
        ]
        for name, split in (("train", train), ("validation", validation))
        for side, prompts in (("fire", split.fire), ("quiet", split.quiet))
    }
    threshold = _lowest_threshold(read["train.quiet"], target_fpr)
    return GateCalibration(
        hook=point.name,
        threshold=sign * threshold,
        below=below,
        target_fpr=target_fpr,
        train=_rates(read["train.fire"], read["train.quiet"], threshold),
        validation=_rates(read["validation.fire"], read["validation.quiet"], threshold),
    )


def _target(target_fpr: float) -> float:
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, int | float):
        raise InvalidArgumentError(f"expected a number, got {target_fpr!r}", field="target_fpr")
    if not (math.isfinite(target_fpr) and 0.0 <= target_fpr < 1.0):
        raise InvalidArgumentError(
            f"must be a finite rate in [0, 1), got {target_fpr!r}", field="target_fpr"
        )
    return float(target_fpr)


def _projections(
    handle: ModelHandle,
    hook: str,
    unit: torch.Tensor,
    prompts: Sequence[str],
    field: str,
    system: str | None,
    batch_size: int,
) -> list[float]:
    """Each prompt's residual at ``hook``, last token, projected onto ``unit`` in float32: the
    number a prompt-scope :class:`~steer.plan.ReadGate` compares with its threshold."""
    if isinstance(prompts, str) or not prompts:
        raise InvalidArgumentError("needs at least one prompt", field=field)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgumentError("expected a non-empty string", field=f"{field}[{index}]")
    ids = [encode_chat(handle, prompt, system) for prompt in prompts]
    last = forward(handle, ids, hooks=[hook], batch_size=batch_size).activations
    activations = next(iter(last.values()))
    assert isinstance(activations, torch.Tensor)  # (prompts, d_model) float32
    projections = (activations @ unit).tolist()
    for index, value in enumerate(projections):
        if not math.isfinite(value):
            raise InvalidArgumentError(
                f"the projection is not finite ({value})", field=f"{field}[{index}]"
            )
    return projections


def _lowest_threshold(quiet: list[float], target_fpr: float) -> float:
    """The lowest ``t`` with ``#{q > t} / n <= target_fpr``: the (m+1)-th largest ``q``, where
    m = floor(target_fpr * n) false positives are allowed (``t`` at a value does not fire on it)."""
    allowed = math.floor(target_fpr * len(quiet) + 1e-9)
    return sorted(quiet, reverse=True)[allowed]


def _rates(fire: list[float], quiet: list[float], threshold: float) -> SplitRates:
    return SplitRates(
        true_positive_rate=sum(p > threshold for p in fire) / len(fire),
        false_positive_rate=sum(p > threshold for p in quiet) / len(quiet),
        fire_count=len(fire),
        quiet_count=len(quiet),
    )
