"""Feature sliders: interventions that edit one SAE feature at the SAE's hook point.

At the hook point the residual stream is ``x = decode(f) + error`` with ``f = encode(x)``. A
slider changes ``f`` to ``f'`` and keeps the error term, so the new value is::

    x' = decode(f') + error = x + (decode(f') - decode(f))

computed as that difference, which is exactly zero wherever ``f' == f`` (``decode`` is
deterministic), so a slider at its neutral value leaves the model's output bit-identical.

Every slider has one knob, ``value`` (as in the proto's ``FeatureSlider.value``); its
:class:`~steer.sae.modes.SliderMode` says what it does:

* :class:`Clamp` -- ``f'_k = value`` (0 switches the feature off);
* :class:`Scale` -- ``f'_k = value * f_k`` (1 is neutral; 0 switches it off where it fires);
* :class:`AddDecoder` -- ``f'_k = f_k + value`` (0 is neutral). For an affine decoder this
  is adding ``value`` times the feature's decoder direction, which lowers to the engine's
  batched ``AddVector`` op; :func:`decoder_direction` gives that direction as a steering vector
  (what a bake of a slider writes: exact for AddDecoder, an approximation for Clamp/Scale, which
  depend on the current activation).

Clamp and Scale lower to the engine's :class:`~steer.interventions.RowFunction` op: per row,
encode the covered tokens, edit, add the decoded difference. Several sliders at one hook point
apply in the order given, each reading the stream the previous one left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from steer.errors import FailedPreconditionError, InvalidArgumentError
from steer.hooks import HookPoint, HookResolver
from steer.interventions import AddVector, Intervention, Op, Phase, RowFunction
from steer.limits import MAX_INTERVENTION_MAGNITUDE, finite
from steer.sae.loading import SparseAutoencoder
from steer.sae.modes import SliderMode
from steer.vectors import SteeringVector


def _check_phase(phase: Phase | str) -> Phase:
    try:
        return Phase(phase)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown phase {phase!r}; use prompt, generated or all", field="phase"
        ) from None


def check_sae(
    sae: SparseAutoencoder, resolver: HookResolver, d_model: int, *, field: str = "sae"
) -> HookPoint:
    """The hook point ``sae`` reads on this model (raises, naming ``field``, for an SAE of
    another width or an unknown hook)."""
    if not isinstance(sae, SparseAutoencoder):
        raise InvalidArgumentError(
            f"expected a SparseAutoencoder, got {type(sae).__name__}", field=field
        )
    point = resolver.parse(sae.hook_name, field=f"{field}.hook_name")
    if sae.d_in != d_model:
        raise InvalidArgumentError(
            f"the SAE reads {sae.d_in}-dimensional activations but the model's d_model is "
            f"{d_model}",
            field=f"{field}.d_in",
        )
    return point


def _edit_function(sae: SparseAutoencoder, feature: int, edit):  # type: ignore[no-untyped-def]
    """A RowFunction body: apply ``edit(f_k) -> f_k'`` to feature ``feature`` on masked tokens."""
    if not sae.affine_decoder:
        raise FailedPreconditionError(
            f"sliders need an SAE without run-time input normalisation (this one has "
            f"normalize_activations={sae.sae.cfg.normalize_activations!r})",
            field="sae",
        )

    def apply(x_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        selected = x_row[mask]  # (n, D)
        features = sae.encode(selected)  # (n, F)
        edited = features.clone()
        edited[:, feature] = edit(features[:, feature])
        changed = (edited[:, feature] != features[:, feature]).nonzero().flatten()
        if changed.numel() == 0:
            return x_row
        delta = sae.decode(edited[changed]) - sae.decode(features[changed])  # (m, D)
        rows = mask.nonzero().flatten()[changed.to(mask.device)]
        out = x_row.clone()
        out[rows] = x_row[rows] + delta.to(x_row.device, x_row.dtype)
        return out

    return apply


@dataclass(frozen=True, eq=False)
class FeatureSlider(Intervention):
    """Base of the sliders: feature ``feature`` of ``sae`` moved by ``value`` on the covered
    tokens, as the subclass's :class:`~steer.sae.modes.SliderMode` says."""

    sae: SparseAutoencoder
    feature: int
    value: float
    phase: Phase = Phase.ALL
    speaker: str | None = None

    mode: ClassVar[SliderMode]

    def __post_init__(self) -> None:
        self.sae.check_feature(self.feature)
        value = finite(self.value, "value", magnitude=MAX_INTERVENTION_MAGNITUDE)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "phase", _check_phase(self.phase))

    def is_noop(self) -> bool:
        return self.value == self.mode.neutral

    def edit(self, activations: torch.Tensor) -> torch.Tensor:
        """The feature's new activations from its current ones (n,) -> (n,)."""
        raise NotImplementedError

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        point = check_sae(self.sae, resolver, d_model)
        fn = _edit_function(self.sae, self.feature, self.edit)
        return [(point, RowFunction(fn, self.phase, self.speaker))]


def row_function(slider: FeatureSlider) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``slider``'s edit as a RowFunction body, whatever its mode (an AddDecoder too: encoded
    and decoded, where its lowering adds the decoder direction): (tokens, D) values and a
    (tokens,) mask -> the values with the masked tokens edited."""
    return _edit_function(slider.sae, slider.feature, slider.edit)  # type: ignore[no-any-return]


@dataclass(frozen=True, eq=False)
class Clamp(FeatureSlider):
    """Set feature ``feature`` of ``sae`` to ``value`` on the covered tokens."""

    mode: ClassVar[SliderMode] = SliderMode.CLAMP

    def edit(self, activations: torch.Tensor) -> torch.Tensor:
        return torch.full_like(activations, self.value)


@dataclass(frozen=True, eq=False)
class Scale(FeatureSlider):
    """Multiply feature ``feature`` of ``sae`` by ``value`` on the covered tokens."""

    mode: ClassVar[SliderMode] = SliderMode.SCALE

    def edit(self, activations: torch.Tensor) -> torch.Tensor:
        return activations * self.value


@dataclass(frozen=True, eq=False)
class AddDecoder(FeatureSlider):
    """Add ``value`` to feature ``feature``: ``x += value * direction_k``."""

    mode: ClassVar[SliderMode] = SliderMode.ADD_DECODER

    def edit(self, activations: torch.Tensor) -> torch.Tensor:
        return activations + self.value

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        if not self.sae.affine_decoder:
            return super().lower(resolver, d_model)
        point = check_sae(self.sae, resolver, d_model)
        vector = self.sae.direction(self.feature) * self.value
        return [(point, AddVector(vector, self.phase, self.speaker))]


#: the slider class of each mode
SLIDERS: dict[SliderMode, type[FeatureSlider]] = {
    slider.mode: slider for slider in (Clamp, Scale, AddDecoder)
}


def feature_slider(
    mode: SliderMode | str,
    sae: SparseAutoencoder,
    feature: int,
    value: float,
    phase: Phase = Phase.ALL,
    speaker: str | None = None,
) -> FeatureSlider:
    """The slider of ``mode`` (a :class:`SliderMode` or its name): the one way from a mode to
    an intervention."""
    return SLIDERS[SliderMode.parse(mode)](sae, feature, value, phase, speaker)


def decoder_direction(sae: SparseAutoencoder, feature: int) -> SteeringVector:
    """The feature's decoder direction at the SAE's layer, as a steering vector.

    ``Add(decoder_direction(sae, k), value, hooks=(sae.hook_name,))`` equals
    ``AddDecoder(sae, k, value)``. For Clamp/Scale it is only an approximation (their
    effect depends on how strongly the feature fires), which is what a bake of them exports.
    """
    layer = sae.hook_point(10**6).layer
    direction = sae.direction(feature)
    name = f"sae-feature-{feature}@{sae.hook_name}"
    if layer is None:
        return SteeringVector.from_shared(direction, name=name)
    return SteeringVector(per_layer={layer: direction}, name=name)
