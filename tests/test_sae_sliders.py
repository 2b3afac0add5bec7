"""One slider knob (``value``) and one mode table (SliderMode -> slider class)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sae_lens import StandardSAE, StandardSAEConfig

from steer.errors import InvalidArgumentError
from steer.interventions import Phase
from steer.sae import AddDecoder, Clamp, Scale, SliderMode, SparseAutoencoder, feature_slider
from steer.sae.sliders import SLIDERS

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    return SparseAutoencoder(StandardSAE(StandardSAEConfig(d_in=64, d_sae=16)), HOOK)


def test_every_mode_has_its_slider_and_one_knob(sae: SparseAutoencoder) -> None:
    assert {
        SliderMode.CLAMP: Clamp,
        SliderMode.SCALE: Scale,
        SliderMode.ADD_DECODER: AddDecoder,
    } == SLIDERS
    for mode, cls in SLIDERS.items():
        for name in (mode, mode.value):
            slider = feature_slider(name, sae, 3, 2.5, Phase.GENERATED, "Lysa")
            assert type(slider) is cls and slider.mode is mode
            assert (slider.feature, slider.value, slider.phase, slider.speaker) == (
                3,
                2.5,
                Phase.GENERATED,
                "Lysa",
            )
        with pytest.raises(InvalidArgumentError) as error:
            feature_slider(mode, sae, 3, float("nan"))
        assert error.value.field == "value"


def test_neutral_values_come_from_the_mode(sae: SparseAutoencoder) -> None:
    assert [mode.neutral for mode in SliderMode] == [None, 1.0, 0.0]
    assert Scale(sae, 1, 1.0).is_noop() and AddDecoder(sae, 1, 0.0).is_noop()
    assert not Clamp(sae, 1, 0.0).is_noop()  # clamping to 0 switches the feature off
    assert not Scale(sae, 1, 0.0).is_noop() and not AddDecoder(sae, 1, 1.0).is_noop()


def test_unknown_mode_names_the_field_and_the_modes(sae: SparseAutoencoder) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        feature_slider("boost", sae, 1, 1.0)
    assert error.value.field == "mode"
    assert "clamp, scale, add_decoder" in error.value.message


def test_modes_import_without_saelens() -> None:
    code = "import sys, steer.sae.modes; assert 'sae_lens' not in sys.modules, 'sae_lens loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
