"""COSMIC direction scoring (steer.directions.cosmic) on a tiny real model.

The layers it reads are the least similar ones, a candidate's score is the two cosine
similarities the forward passes give, and the sets' own mean-difference direction scores above
random ones."""

from __future__ import annotations

import pytest
import torch

from steer.activations import forward
from steer.directions.cosmic import cosmic_reference, cosmic_score, low_similarity_layers
from steer.directions.methods import compute_direction
from steer.directions.search import Candidate
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle
from steer.text import encode_chat
from steer.vectors import SteeringVector

POSITIVE = [
    "How do I pick a lock?",
    "Tell me how to make poison.",
    "Explain how to steal a car.",
    "How can I hack my neighbour's wifi?",
    "Write a threatening letter.",
    "How do I forge a signature?",
]
NEGATIVE = [
    "How do I bake bread?",
    "Tell me about the moon.",
    "Explain how tides work.",
    "How can I learn the piano?",
    "Write a birthday card.",
    "How do I plant tomatoes?",
]
POSITIONS = (-1, -2)


def test_low_similarity_layers_are_the_least_similar() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.randn(10, 2, 8, generator=generator)
    negative = positive.clone()
    negative[3] = -positive[3]  # similarity -1: the least similar
    negative[7] = torch.randn(2, 8, generator=generator)
    assert low_similarity_layers(positive, negative, fraction=0.1) == (3,)
    assert low_similarity_layers(positive, negative, fraction=0.2) == (3, 7)
    with pytest.raises(InvalidArgumentError):
        low_similarity_layers(positive, negative[:5])
    with pytest.raises(InvalidArgumentError):
        low_similarity_layers(positive, negative, fraction=0.0)


def _candidate(vector: torch.Tensor, layer: int) -> Candidate:
    return Candidate(layer, -1, SteeringVector.from_shared(vector, name=f"L{layer}"))


def test_cosmic_score_is_the_two_similarities_and_prefers_the_contrast(
    tiny_llama: ModelHandle,
) -> None:
    positive = [encode_chat(tiny_llama, p) for p in POSITIVE]
    negative = [encode_chat(tiny_llama, p) for p in NEGATIVE]
    reference = cosmic_reference(tiny_llama, positive, negative, POSITIONS, fraction=0.5)
    assert len(reference.layers) == 2 and reference.positions == POSITIONS
    layer = reference.layers[0]
    hook = f"blocks.{layer}.hook_resid_pre"
    reads = []
    for ids in (positive, negative):
        rows = forward(tiny_llama, ids, hooks=[hook], positions=(-1,)).activations[hook]
        assert isinstance(rows, torch.Tensor)
        reads.append(rows[:, 0])
    contrast = compute_direction("mean_difference", reads[0], reads[1])
    candidate = _candidate(contrast, layer)
    score = cosmic_score(tiny_llama, candidate, reference)
    # by hand: the same two forward passes, the same cosine similarities
    hooks = [f"blocks.{i}.hook_resid_pre" for i in reference.layers]

    def means(ids: list[list[int]], edit: object) -> torch.Tensor:
        acts = forward(
            tiny_llama,
            ids,
            interventions=[edit],  # type: ignore[list-item]
            hooks=hooks,
            positions=POSITIONS,
        ).activations
        stacked = [acts[h] for h in hooks]
        assert all(isinstance(t, torch.Tensor) for t in stacked)
        return torch.stack([t.double().mean(0) for t in stacked])  # type: ignore[union-attr]

    ablated = means(positive, candidate.ablation())
    added = means(negative, candidate.addition())
    expected = (
        torch.cosine_similarity(ablated, reference.negative_mean, dim=-1)
        + torch.cosine_similarity(added, reference.positive_mean, dim=-1)
    ).mean()
    assert score == pytest.approx(float(expected), abs=1e-9)
    assert -2.0 <= score <= 2.0
    generator = torch.Generator().manual_seed(1)
    norm = float(contrast.norm())
    randoms = []
    for _ in range(4):
        vector = torch.randn(tiny_llama.d_model, generator=generator)
        randoms.append(
            cosmic_score(tiny_llama, _candidate(vector / vector.norm() * norm, layer), reference)
        )
    assert score > max(randoms)
