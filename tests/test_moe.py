"""Mixture-of-experts models (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE): hook values, run-time ablation, and baked weights == run-time interventions."""

from __future__ import annotations

import torch

from steer.activations import forward
from steer.interventions import Ablate, Add
from steer.models import ModelHandle
from steer.recipes import load_recipe
from steer.vectors import SteeringVector

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]


def relative_difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    return max(
        ((r - c).abs().max() / r.abs().max()).item()
        for r, c in zip(reference, candidate, strict=True)
    )


def logits(handle: ModelHandle, interventions=()) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    result = forward(handle, PROMPTS, interventions=interventions, logits="all")
    assert isinstance(result.logits, list)
    return result.logits


def random_vector(seed: int, layers: int = 4, d_model: int = 64) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(
        per_layer={layer: torch.randn(d_model, generator=generator) for layer in range(layers)}
    )


def interventions_of(recipe: dict, num_layers: int = 4) -> list:  # type: ignore[type-arg]
    return [i for _edit, group in load_recipe(recipe).interventions(num_layers) for i in group]


# ---------------------------------------------------------------------------------------------
# Hooks and run-time interventions


def test_every_hook_name_resolves_to_the_residual_stream(tiny_moe: ModelHandle) -> None:
    """resid_pre/post agree with HF hidden_states; mid = pre + attn_out; post = mid + mlp_out,
    where mlp_out is the whole MoE block's output."""
    names = tiny_moe.hook_names()
    assert len(names) == 1 + 5 * tiny_moe.num_layers
    prompt = PROMPTS[0]
    acts = forward(tiny_moe, [prompt], hooks=names, positions="all").activations
    with torch.no_grad():
        hidden = tiny_moe.model(torch.tensor([prompt]), output_hidden_states=True).hidden_states

    def get(name: str) -> torch.Tensor:
        value = acts[name]
        assert isinstance(value, list)
        return value[0]

    torch.testing.assert_close(get("hook_embed"), hidden[0][0])
    for layer in range(tiny_moe.num_layers):
        pre = get(f"blocks.{layer}.hook_resid_pre")
        mid = get(f"blocks.{layer}.hook_resid_mid")
        post = get(f"blocks.{layer}.hook_resid_post")
        torch.testing.assert_close(pre, hidden[layer][0])
        if layer + 1 < tiny_moe.num_layers:  # HF's last hidden state is after the final norm
            torch.testing.assert_close(post, hidden[layer + 1][0])
        torch.testing.assert_close(mid, pre + get(f"blocks.{layer}.hook_attn_out"))
        mlp_out = get(f"blocks.{layer}.hook_mlp_out")
        torch.testing.assert_close(post, mid + mlp_out)
        assert mlp_out.abs().max() > 1e-2  # the block writes something


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
