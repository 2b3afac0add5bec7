"""An artifact turns into an intervention in one place: VectorArtifact.addition / .ablation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steer.artifacts import VectorArtifact, load_vector, save_vector
from steer.cli.eval_rp import _interventions
from steer.errors import InvalidArgumentError
from steer.hooks import HookKind, HookPoint
from steer.interventions import Ablate, Add, Phase, validate
from steer.models import ModelHandle
from steer.vectors import SteeringVector


def _vector(layers: tuple[int, ...], d_model: int, seed: int = 0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(
        per_layer={layer: torch.randn(d_model, generator=generator) for layer in layers},
        name="partial",
    )


def _lowered_layers(intervention: Ablate | Add, handle: ModelHandle) -> set[int | None]:
    ops = intervention.lower(handle.resolver, handle.d_model)
    return {point.layer for point, _op in ops}


def test_eval_rp_ablates_only_the_layers_a_per_layer_direction_has(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    # a direction for 2 of the 4 layers: ablating "everywhere" cannot work, ablating where it
    # has vectors (as the server does) must
    path = save_vector(tmp_path / "partial", _vector((1, 2), tiny_llama.d_model), handle=tiny_llama)
    (ablation,) = _interventions(tiny_llama, [str(path)])
    validate([ablation], tiny_llama.resolver, tiny_llama.d_model)
    assert isinstance(ablation, Ablate)
    assert _lowered_layers(ablation, tiny_llama) == {1, 2}
    (scoped,) = _interventions(tiny_llama, [f"{path}@Lysa"])
    assert isinstance(scoped, Ablate) and scoped.speaker == "Lysa"


def test_eval_rp_adds_at_the_artifacts_hooks(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    hooks = ["blocks.2.hook_mlp_out"]
    vector = _vector((2,), tiny_llama.d_model)
    path = save_vector(tmp_path / "warm", vector, handle=tiny_llama, hooks=hooks)
    (addition,) = _interventions(tiny_llama, [f"{path}:4@Garrick"])
    assert isinstance(addition, Add)
    assert addition.hooks == tuple(hooks)
    assert (addition.strength, addition.speaker) == (4.0, "Garrick")
    ((point, _op),) = addition.lower(tiny_llama.resolver, tiny_llama.d_model)
    assert point == HookPoint(2, HookKind.MLP_OUT)


def test_addition_hooks_explicit_then_layers_then_recorded_then_resid_post(
    tiny_llama: ModelHandle,
) -> None:
    d_model = tiny_llama.d_model
    recorded = VectorArtifact(_vector((1, 3), d_model), {"hooks": ["blocks.1.hook_resid_pre"]})
    bare = VectorArtifact(_vector((1, 3), d_model))
    assert recorded.addition(2.0, hooks=["blocks.0.hook_mlp_out"]).hooks == (
        "blocks.0.hook_mlp_out",
    )
    assert recorded.addition(layers=(3,)).hooks == ("blocks.3.hook_resid_post",)
    assert recorded.addition().hooks == ("blocks.1.hook_resid_pre",)
    assert bare.addition().hooks == ()
    default = bare.addition(0.5, phase=Phase.GENERATED)
    assert default.phase is Phase.GENERATED and default.strength == 0.5
    points = {point for point, _op in default.lower(tiny_llama.resolver, d_model)}
    assert points == {HookPoint(1, HookKind.RESID_POST), HookPoint(3, HookKind.RESID_POST)}


def test_ablation_layers(tiny_llama: ModelHandle) -> None:
    d_model = tiny_llama.d_model
    per_layer = VectorArtifact(_vector((0, 3), d_model))
    assert per_layer.ablation().layers == (0, 3)
    assert per_layer.ablation(0.5, layers=[3]).layers == (3,)
    assert per_layer.ablation(layer_weights={3: 0.5}).weight_at(3) == 0.5
    shared = VectorArtifact(SteeringVector.from_shared(torch.ones(d_model)))
    assert shared.ablation().layers is None
    assert _lowered_layers(shared.ablation(), tiny_llama) == set(range(tiny_llama.num_layers))
    with pytest.raises(InvalidArgumentError):
        per_layer.ablation(layers=[1]).lower(tiny_llama.resolver, d_model)


def test_loaded_artifact_records_its_hooks(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    vector = _vector((2,), tiny_llama.d_model)
    path = save_vector(tmp_path / "v", vector, handle=tiny_llama, hooks=["blocks.2.hook_attn_out"])
    assert load_vector(path).hooks == ("blocks.2.hook_attn_out",)
    assert load_vector(save_vector(tmp_path / "w", vector)).hooks == ()


def test_an_unreadable_sidecar_is_a_field_error(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    from steer.json_input import read_object

    path = save_vector(tmp_path / "v", _vector((2,), tiny_llama.d_model))
    (path / "steer.json").unlink()
    (path / "steer.json").mkdir()  # exists, cannot be read as a file
    with pytest.raises(InvalidArgumentError) as error:
        load_vector(path)
    assert error.value.field == "steer_json" and "cannot be read" in error.value.message
    with pytest.raises(InvalidArgumentError) as missing:
        read_object(tmp_path / "absent.json", what="absent.json", field="f")
    assert missing.value.field == "f" and missing.value.message.startswith("absent.json cannot")
