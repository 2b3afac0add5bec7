"""Sparse autoencoders: load SAELens SAEs, train one, inspect features, steer with sliders.

Names are imported on first use: SAELens is slow to import, and :mod:`steer.sae.modes` (the
slider modes the client and the service share) must not pull it in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steer.sae.conditions import FeatureCondition
    from steer.sae.loading import SparseAutoencoder, load_pretrained_sae, load_sae
    from steer.sae.modes import SliderMode
    from steer.sae.sliders import AddDecoder, Clamp, Scale, decoder_direction, feature_slider

#: public name -> the module that defines it
_HOMES = {
    "AddDecoder": "steer.sae.sliders",
    "Clamp": "steer.sae.sliders",
    "FeatureCondition": "steer.sae.conditions",
    "Scale": "steer.sae.sliders",
    "SliderMode": "steer.sae.modes",
    "SparseAutoencoder": "steer.sae.loading",
    "decoder_direction": "steer.sae.sliders",
    "feature_slider": "steer.sae.sliders",
    "load_pretrained_sae": "steer.sae.loading",
    "load_sae": "steer.sae.loading",
}

__all__ = [
    "AddDecoder",
    "Clamp",
    "FeatureCondition",
    "Scale",
    "SliderMode",
    "SparseAutoencoder",
    "decoder_direction",
    "feature_slider",
    "load_pretrained_sae",
    "load_sae",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'steer.sae' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
