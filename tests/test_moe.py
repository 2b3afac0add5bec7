"""Mixture-of-experts models: hook values, run-time ablation, baked weights == run-time.

Tiny Mixtral, Qwen2-MoE (a shared expert, and a dense MLP in layer 1) and Qwen3-MoE models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from equivalence import (
    PROMPTS,
    interventions_of,
    logits,
    random_vector,
    relative_difference,
    residual_stream,
)
from safetensors import safe_open
from tiny import MOE_ARCHITECTURES, tiny_handle

from steer.activations import forward
from steer.artifacts import save_vector
from steer.bake import bake
from steer.bake.memory import edited_copy
from steer.bake.source import open_source
from steer.errors import InvalidArgumentError, UnsupportedArchitectureError
from steer.interventions import Ablate, Add
from steer.models import ModelHandle, load_model
from steer.recipes import load_edit_recipe
from steer.vectors import SteeringVector


def stored_names(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as stored:
        return list(stored.keys())


# ---------------------------------------------------------------------------------------------
# Hooks and run-time interventions


def test_every_hook_name_resolves_to_the_residual_stream(tiny_moe: ModelHandle) -> None:
    """The residual identities of tests/equivalence.py hold, where mlp_out is the whole MoE
    block's output."""
    names = tiny_moe.hook_names()
    assert len(names) == 1 + 5 * tiny_moe.num_layers
    values = residual_stream(tiny_moe, PROMPTS[0])
    for layer in range(tiny_moe.num_layers):
        assert values[f"blocks.{layer}.hook_mlp_out"].abs().max() > 1e-2  # the block writes


def test_runtime_ablation_removes_the_direction_everywhere(tiny_moe: ModelHandle) -> None:
    direction = random_vector(1)
    names = [name for name in tiny_moe.hook_names() if name != "hook_embed"]
    before = forward(tiny_moe, PROMPTS, hooks=names, positions="all").activations
    after = forward(
        tiny_moe, PROMPTS, hooks=names, positions="all", interventions=[Ablate(direction)]
    ).activations
    for name in names:
        layer = int(name.split(".")[1])
        unit = direction.at(layer) / direction.at(layer).norm()
        projections_after = torch.cat([x @ unit for x in after[name]])
        projections_before = torch.cat([x @ unit for x in before[name]])
        assert projections_after.abs().max() < 1e-4, name
        assert projections_before.abs().max() > 1e-2, name


def test_zero_strength_is_bit_identical(tiny_moe: ModelHandle) -> None:
    direction = random_vector(1)
    reference = logits(tiny_moe)
    for interventions in (
        [Ablate(direction, weight=0.0)],
        [Add(direction, 0.0)],
        [Ablate(direction, layer_weights={})],
    ):
        for expected, actual in zip(reference, logits(tiny_moe, interventions), strict=True):
            assert torch.equal(expected, actual)


# ---------------------------------------------------------------------------------------------
# Baking


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelHandle, Path, Path]]:
    """Per MoE architecture: the tiny handle, its saved directory, a direction artifact."""
    root = tmp_path_factory.mktemp("moe-sources")
    result = {}
    for architecture in MOE_ARCHITECTURES:
        handle = tiny_handle(architecture)
        source = root / architecture
        handle.model.save_pretrained(source)
        handle.tokenizer.save_pretrained(source)
        direction = save_vector(root / f"{architecture}-direction", random_vector(1), handle=handle)
        result[architecture] = (handle, source, direction)
    return result


KERNEL = {"max_weight": 1.0, "min_weight": 0.3, "peak_layer": 1.5, "width": 2.0}
ABLATIONS = {
    "full": {},
    "kernel": {"kernel": KERNEL},
    "projected": {"variant": "projected"},
}
CASES = [(a, c) for a in MOE_ARCHITECTURES for c in ABLATIONS]


def _recipe(direction: Path, case: str, mean: Path) -> dict:  # type: ignore[type-arg]
    edit = {"kind": "ablate", "direction": str(direction), **ABLATIONS[case]}
    if case == "projected":
        edit["harmless_mean"] = str(mean)
    return {"edits": [edit]}


@pytest.mark.parametrize(("architecture", "case"), CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_baked_ablation_equals_runtime(sources, tmp_path, architecture, case) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    mean = save_vector(tmp_path / "mean", random_vector(2), handle=handle)
    recipe = _recipe(direction, case, mean)
    out = bake(str(source), recipe, tmp_path / "out")
    baked = load_model(out)  # from_pretrained: the per-expert checkpoint names load
    runtime = logits(handle, interventions_of(recipe))
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    assert relative_difference(runtime, logits(handle)) > 1e-2
    assert baked.architecture == architecture
    # every expert's down-projection lost the direction (layer 2 is MoE in all three)
    experts = baked.model.model.layers[2].mlp.experts.down_proj  # (experts, d_model, inner)
    original = handle.model.model.layers[2].mlp.experts.down_proj
    unit = random_vector(1).at(2) / random_vector(1).at(2).norm()
    if case == "full":
        assert torch.einsum("d,edi->ei", unit, experts).abs().max() < 1e-4
    assert torch.einsum("d,edi->ei", unit, original).abs().max() > 1e-1
    _check_router_untouched(handle, baked)


def _check_router_untouched(handle: ModelHandle, baked: ModelHandle) -> None:
    """Routers, expert gate/up projections and the shared expert's gate read the stream; the
    bake leaves them as they were."""
    baked_state = baked.model.state_dict()
    checked = 0
    for name, tensor in handle.model.state_dict().items():
        if any(part in name for part in ("mlp.gate.", "gate_up_proj", "shared_expert_gate")):
            assert torch.equal(baked_state[name], tensor), name
            checked += 1
    assert checked >= 4


def test_full_ablation_equals_plain_ablate_with_shared_and_dense_layers(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Qwen2-MoE: routed experts, the shared expert and the dense MLP of layer 1 are all
    orthogonalised; together with the embedding that equals the plain run-time Ablate."""
    handle, source, direction = sources["qwen2_moe"]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "direction_layer": 2}]}
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    unit = random_vector(1).at(2) / random_vector(1).at(2).norm()
    plain = Ablate(SteeringVector.from_shared(unit))
    assert relative_difference(logits(handle, [plain]), logits(baked)) <= 1e-4
    layers = baked.model.model.layers
    for matrix in (
        layers[0].mlp.shared_expert.down_proj.weight,
        layers[1].mlp.down_proj.weight,
        layers[3].mlp.experts.down_proj,  # (experts, d_model, inner)
    ):
        assert (unit @ matrix).abs().max() < 1e-4
    assert (unit @ handle.model.model.layers[1].mlp.down_proj.weight).abs().max() > 1e-1


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_norm_preserving_equals_in_memory_form(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    recipe = {
        "edits": [{"kind": "ablate", "direction": str(direction), "variant": "norm_preserving"}]
    }
    edited = edited_copy(handle, load_edit_recipe(recipe))
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    assert relative_difference(logits(edited), logits(baked)) <= 1e-4
    before = handle.model.model.layers[2].mlp.experts.down_proj
    after = baked.model.model.layers[2].mlp.experts.down_proj
    # per expert, the norm of every written vector (column) is kept
    torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1), rtol=1e-5, atol=1e-6)
    plain = logits(
        handle, interventions_of({"edits": [{**recipe["edits"][0], "variant": "standard"}]})
    )
    assert relative_difference(plain, logits(baked)) > 1e-3


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"])
def test_addition_has_no_exact_form(sources, tmp_path, architecture, hook) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources[architecture]
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "hooks": [hook]}]}
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        bake(str(source), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_addition_at_the_embedding_is_exact(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources["mixtral"]
    recipe = {
        "edits": [
            {
                "kind": "add",
                "vector": str(direction),
                "strength": 2.0,
                "hooks": ["blocks.0.hook_resid_pre"],
            }
        ]
    }
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    runtime = logits(handle, interventions_of(recipe))
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    assert relative_difference(runtime, logits(handle)) > 1e-2


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_zero_strength_bake_is_a_copy(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "weight": 0.0}]}
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    baked_state = baked.model.state_dict()
    for name, tensor in handle.model.state_dict().items():
        assert torch.equal(baked_state[name], tensor), name
    for reference, candidate in zip(logits(handle), logits(baked), strict=True):
        assert torch.equal(reference, candidate)


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_weight_hash_of_the_checkpoint_equals_the_handle(sources, architecture) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints store one tensor per expert, the loaded model stacks them: the source's weight
    hash reassembles the stacked tensors, so a direction's sidecar hash is accepted."""
    handle, source, _direction = sources[architecture]
    assert not any(name.endswith("experts.down_proj") for name in stored_names(source))
    assert open_source(str(source)).weight_hash() == handle.weight_hash
    other = tiny_handle(architecture, seed=1)
    assert open_source(str(source)).weight_hash() != other.weight_hash


def test_stacked_checkpoint_names_bake_too(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint holding the stacked 3-D expert tensors (transformers' module names, as an
    in-memory source has them) is edited expert by expert and keeps those names."""
    from safetensors.torch import save_file

    handle, source, direction = sources["qwen3_moe"]
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    state = {name: t.contiguous() for name, t in handle.model.state_dict().items()}
    save_file(state, str(stacked / "model.safetensors"), metadata={"format": "pt"})
    for file in source.iterdir():
        if not file.name.endswith(".safetensors"):
            (stacked / file.name).write_bytes(file.read_bytes())
    assert open_source(str(stacked)).weight_hash() == handle.weight_hash
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "kernel": KERNEL}]}
    out = bake(str(stacked), recipe, tmp_path / "out")
    assert "model.layers.2.mlp.experts.down_proj" in stored_names(out)
    baked = load_model(out)
    assert relative_difference(logits(handle, interventions_of(recipe)), logits(baked)) <= 1e-4


def test_lora_export_refuses_expert_edits(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["mixtral"]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    with pytest.raises(InvalidArgumentError, match="experts"):
        bake(str(source), recipe, tmp_path / "lora", output_format="lora")
    assert not (tmp_path / "lora").exists()


def test_provenance_names_the_edited_expert_tensors(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["mixtral"]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [1]}]}
    out = bake(str(source), recipe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    with (
        safe_open(str(source / "model.safetensors"), "pt") as before,
        safe_open(str(out / "model.safetensors"), "pt") as after,
    ):
        changed = {
            name
            for name in stored_names(source)
            if not torch.equal(before.get_tensor(name), after.get_tensor(name))
        }
    expected = {f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)}
    assert changed == expected | {"model.layers.1.self_attn.o_proj.weight"}
