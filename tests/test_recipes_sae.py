"""A recipe's feature edit reads the SAE through steer.sae.loading: same checks, same hook rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from safetensors.torch import save_file

from steer.errors import InvalidArgumentError, NotFoundError
from steer.interventions import Add
from steer.recipes import load_edit_recipe
from steer.sae.loading import load_sae

HOOK = "blocks.1.hook_resid_post"


def _feature_add(sae: Path, feature: int = 3, value: float = 2.0) -> Add:
    recipe = load_edit_recipe(
        {"edits": [{"kind": "feature", "sae": str(sae), "feature": feature, "value": value}]}
    )
    (intervention,) = recipe.lowered(4)
    assert isinstance(intervention, Add)
    return intervention


def _hand_written(directory: Path, config: dict, decoder: torch.Tensor) -> Path:  # type: ignore[type-arg]
    directory.mkdir()
    save_file({"W_dec": decoder}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(config))
    return directory


def test_feature_edit_reads_what_load_sae_reads(tmp_path: Path) -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=16))
    sae.cfg.metadata.hook_name = HOOK
    with torch.no_grad():
        sae.W_dec.normal_()
    sae.save_model(str(tmp_path / "sae"))
    add = _feature_add(tmp_path / "sae")
    assert add.hooks == (load_sae(tmp_path / "sae").hook_name,) == (HOOK,)
    assert add.strength == 2.0
    assert torch.equal(add.vector.at(1), sae.W_dec[3].detach().float())


def test_feature_edit_refuses_what_load_sae_refuses(tmp_path: Path) -> None:
    decoder = torch.randn(8, 64)
    config = {"d_in": 64, "d_sae": 8, "metadata": {"hook_name": HOOK}}
    transcoder = _hand_written(tmp_path / "tc", {**config, "architecture": "transcoder"}, decoder)
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(transcoder)
    assert error.value.field == "edits[0].sae.architecture"
    heads = _hand_written(tmp_path / "z", {**config, "reshape_activations": "hook_z"}, decoder)
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(heads)
    assert error.value.field == "edits[0].sae.hook_name"
    # a decoder that is not (d_sae, d_in) as cfg.json says
    wrong = _hand_written(tmp_path / "wrong", {**config, "d_in": 32}, decoder)
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(wrong)
    assert error.value.field == "edits[0].sae"
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(_hand_written(tmp_path / "bad", {**config, "d_sae": "8"}, decoder))
    assert error.value.field == "edits[0].sae.d_sae"
    with pytest.raises(NotFoundError) as missing:
        _feature_add(tmp_path / "absent")
    assert missing.value.field == "edits[0].sae"


def test_feature_edit_errors_keep_their_fields(tmp_path: Path) -> None:
    decoder = torch.randn(8, 64)
    legacy = _hand_written(
        tmp_path / "legacy", {"d_in": 64, "d_sae": 8, "hook_name": HOOK}, decoder
    )
    assert _feature_add(legacy).hooks == (HOOK,)  # an older config's top-level hook_name
    nameless = _hand_written(tmp_path / "nameless", {"d_in": 64, "d_sae": 8}, decoder)
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(nameless)
    assert error.value.field == "edits[0].sae.hook_name"
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(legacy, feature=8)
    assert error.value.field == "edits[0].feature"
    deep = _hand_written(
        tmp_path / "deep",
        {"d_in": 64, "d_sae": 8, "hook_name": "blocks.9.hook_resid_post"},
        decoder,
    )
    with pytest.raises(InvalidArgumentError) as error:
        _feature_add(deep)
    assert error.value.field == "edits[0].sae"
