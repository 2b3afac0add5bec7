"""Helpers of the equivalence tests: baked == run-time logits, hook values == hidden states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steer.activations import forward
from steer.models import ModelHandle
from steer.recipes import load_edit_recipe
from steer.vectors import SteeringVector

#: token-id prompts of different lengths (padding is exercised) for the tiny models
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]


def relative_difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    return max(
        ((r - c).abs().max() / r.abs().max()).item()
        for r, c in zip(reference, candidate, strict=True)
    )


def logits(
    handle: ModelHandle,
    interventions: Sequence[Any] = (),
    prompts: Sequence[Sequence[int]] = PROMPTS,
) -> list[torch.Tensor]:
    result = forward(handle, prompts, interventions=interventions, logits="all")
    assert isinstance(result.logits, list)
    return result.logits


def random_vector(seed: int, layers: int = 4, d_model: int = 64) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(
        per_layer={layer: torch.randn(d_model, generator=generator) for layer in range(layers)}
    )


def interventions_of(recipe: dict[str, Any], num_layers: int = 4) -> list[Any]:
    return load_edit_recipe(recipe).lowered(num_layers)


def residual_stream(handle: ModelHandle, prompt: list[int]) -> dict[str, torch.Tensor]:
    """Every hook's values on ``prompt``, after checking them against the model: resid_pre/post
    agree with HF hidden_states; mid = pre + attn_out; post = mid + mlp_out."""
    names = handle.hook_names()
    acts = forward(handle, [prompt], hooks=names, positions="all").activations
    with torch.no_grad():
        hidden = handle.model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    values = {}
    for name in names:
        value = acts[name]
        assert isinstance(value, list)
        values[name] = value[0]
    torch.testing.assert_close(values["hook_embed"], hidden[0][0])
    for layer in range(handle.num_layers):
        pre = values[f"blocks.{layer}.hook_resid_pre"]
        mid = values[f"blocks.{layer}.hook_resid_mid"]
        post = values[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(pre, hidden[layer][0])
        if layer + 1 < handle.num_layers:  # HF's last hidden state is after the final norm
            torch.testing.assert_close(post, hidden[layer + 1][0])
        torch.testing.assert_close(mid, pre + values[f"blocks.{layer}.hook_attn_out"])
        torch.testing.assert_close(post, mid + values[f"blocks.{layer}.hook_mlp_out"])
    return values
