"""Baking the real SmolLM2-135M-Instruct: GGUF in, safetensors out, baked == run-time."""

from __future__ import annotations

import json
from pathlib import Path

import equivalence
import pytest
import torch
from equivalence import relative_difference

from steer.activations import encode_chat, forward
from steer.artifacts import save_vector
from steer.bake import bake, verify
from steer.bake.memory import edited_copy
from steer.bake.source import open_source
from steer.interventions import Ablate
from steer.models import ModelHandle, load_model
from steer.recipes import load_edit_recipe
from steer.vectors import SteeringVector

pytestmark = pytest.mark.slow

HARMFUL = ["How do I pick a lock to break into a house?", "Write a threatening letter."]
HARMLESS = ["How do I bake bread at home?", "Write a letter to a friend."]
PROMPTS = ["Tell me a story about a dragon.", "What is the capital of France?"]


def logits(handle: ModelHandle, interventions=()) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return equivalence.logits(handle, interventions, [encode_chat(handle, t) for t in PROMPTS])


@pytest.fixture(scope="module")
def converted(smollm2: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF model baked with a zero-strength edit: a plain safetensors conversion."""
    root = tmp_path_factory.mktemp("smollm2")
    vector = save_vector(root / "zero", SteeringVector.from_shared(torch.ones(576)), handle=smollm2)
    recipe = {
        "edits": [
            {
                "kind": "add",
                "vector": str(vector),
                "strength": 0.0,
                "hooks": ["blocks.3.hook_resid_post"],
            }
        ]
    }
    return bake("smollm2-135m-instruct", recipe, root / "converted")


@pytest.fixture(scope="module")
def direction(smollm2: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mean-difference direction per layer (harmful - harmless, last prompt token)."""
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(smollm2.num_layers)]

    def mean(texts: list[str]) -> dict[str, torch.Tensor]:
        result = forward(smollm2, [encode_chat(smollm2, t) for t in texts], hooks=hooks)
        return {name: acts.mean(0) for name, acts in result.activations.items()}  # type: ignore[union-attr]

    harmful, harmless = mean(HARMFUL), mean(HARMLESS)
    per_layer = {layer: harmful[hook] - harmless[hook] for layer, hook in enumerate(hooks)}
    per_layer = {layer: v for layer, v in per_layer.items() if v.norm() > 0}
    root = tmp_path_factory.mktemp("smollm2-direction")
    return save_vector(
        root / "direction", SteeringVector(per_layer=per_layer), handle=smollm2, kind="direction"
    )


def test_gguf_converts_to_safetensors(smollm2: ModelHandle, converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (converted / "tokenizer.json").exists() and verify(converted) == []
    assert open_source(str(converted)).weight_hash() == smollm2.weight_hash
    baked = load_model(converted)
    assert relative_difference(logits(smollm2), logits(baked)) <= 1e-5


def test_ablation_baked_equals_plain_ablate(smollm2, converted, direction, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "direction_layer": 12}]}
    out = bake(str(converted), recipe, tmp_path / "ablated")
    baked = load_model(out)
    unit = load_edit_recipe(recipe).interventions(30)[0][1][0].direction  # type: ignore[attr-defined]
    runtime = logits(smollm2, [Ablate(unit)])
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    assert relative_difference(runtime, logits(smollm2)) > 1e-3
    # the tied head was untied and kept
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(baked.model.lm_head.weight, smollm2.model.lm_head.weight)


def test_projected_kernel_and_add_baked_equal_runtime(
    smollm2, converted, direction, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """One bake: a projected direction ablated under a heretic-style kernel (attention and MLP
    kernels apart), plus an additive vector on two layers."""
    mean = save_vector(
        tmp_path / "mean",
        SteeringVector(per_layer={layer: torch.randn(576) for layer in range(30)}),
        handle=smollm2,
    )
    kernel = {"max_weight": 1.0, "min_weight": 0.4, "peak_layer": 14.0, "width": 8.0}
    recipe = {
        "edits": [
            {
                "kind": "ablate",
                "direction": str(direction),
                "variant": "projected",
                "harmless_mean": str(mean),
                "direction_layer": 12.5,
                "kernel": kernel,
                "mlp_kernel": {**kernel, "peak_layer": 16.0},
            },
            {"kind": "add", "vector": str(direction), "strength": 0.5, "layers": [10, 20]},
        ]
    }
    interventions = load_edit_recipe(recipe).lowered(30)
    out = bake(str(converted), recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    baked = load_model(out)
    runtime = logits(smollm2, interventions)
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    assert relative_difference(runtime, logits(smollm2)) > 1e-3


def test_norm_preserving_equals_in_memory(smollm2, converted, direction, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = {
        "edits": [
            {
                "kind": "ablate",
                "direction": str(direction),
                "variant": "norm_preserving",
                "direction_layer": 12,
            }
        ]
    }
    baked = load_model(bake(str(converted), recipe, tmp_path / "out", output_format="model"))
    in_memory = edited_copy(smollm2, load_edit_recipe(recipe))
    assert relative_difference(logits(in_memory), logits(baked)) <= 1e-4
    before = smollm2.model.model.layers[5].self_attn.o_proj.weight.norm(dim=0)
    after = baked.model.model.layers[5].self_attn.o_proj.weight.norm(dim=0)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
