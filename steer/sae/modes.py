"""Feature-slider modes: what a slider's one ``value`` does to an SAE feature (no SAELens needed).

The one table of modes: :mod:`steer.sae.sliders` maps each to its intervention class, the
service and the client map them to the proto's ``SliderMode`` and read ``neutral`` from here.
"""

from __future__ import annotations

from enum import StrEnum

from steer.errors import InvalidArgumentError


class SliderMode(StrEnum):
    """How a slider edits feature ``k``: ``f_k <- value``, ``value * f_k`` or ``f_k + value``."""

    CLAMP = "clamp"
    SCALE = "scale"
    ADD_DECODER = "add_decoder"

    @property
    def neutral(self) -> float | None:
        """The value that changes nothing (None: a clamp has none)."""
        return _NEUTRAL[self]

    @classmethod
    def parse(cls, name: str, field: str = "mode") -> SliderMode:
        """``name`` as a mode, or :class:`InvalidArgumentError` naming ``field`` and the modes."""
        try:
            return cls(name)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown slider mode {name!r}; use {', '.join(mode.value for mode in cls)}",
                field=field,
            ) from None


_NEUTRAL: dict[SliderMode, float | None] = {
    SliderMode.CLAMP: None,
    SliderMode.SCALE: 1.0,
    SliderMode.ADD_DECODER: 0.0,
}
