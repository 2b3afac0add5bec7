"""COSMIC: choosing a direction by what it does to activations, not to the model's words.

COSMIC (arXiv 2506.00085) scores a candidate direction without any refusal-string or refusal-
token score: at the layers where the two sets' mean activations differ most (the lowest cosine
similarity between them, :func:`low_similarity_layers`), ablating the candidate should make the
positive prompts' mean activation look like the negative prompts' mean, and adding it should make
the negative prompts' mean look like the positive prompts'. The score
(:func:`cosmic_score`) is the sum of those two cosine similarities, averaged over those layers
and the post-instruction positions; the higher, the better. steer's candidates
(:mod:`steer.directions.search`) are scored so by ``scripts/cosmic_refusal.py``, which compares
the choice with the bypass-score one the search makes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.activations import forward
from steer.directions.search import Candidate, collect
from steer.errors import InvalidArgumentError
from steer.interventions import Intervention
from steer.models import ModelHandle

__all__ = ["CosmicReference", "cosmic_reference", "cosmic_score", "low_similarity_layers"]


def _hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def low_similarity_layers(
    positive: torch.Tensor, negative: torch.Tensor, *, fraction: float = 0.1
) -> tuple[int, ...]:
    """The ``fraction`` of layers (at least one) where the cosine similarity of the two sets'
    mean activations, averaged over positions, is lowest. ``positive`` and ``negative``:
    (num_layers, positions, d_model) means."""
    if positive.shape != negative.shape or positive.dim() != 3:
        raise InvalidArgumentError(
            f"expected two (layers, positions, d_model) means of one shape, got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}",
            field="means",
        )
    if not 0.0 < fraction <= 1.0:
        raise InvalidArgumentError(
            f"expected a fraction in (0, 1], got {fraction}", field="fraction"
        )
    similarity = torch.cosine_similarity(positive.double(), negative.double(), dim=-1).mean(-1)
    count = max(1, math.ceil(fraction * positive.shape[0]))
    return tuple(sorted(int(i) for i in similarity.argsort()[:count]))


@dataclass(frozen=True)
class CosmicReference:
    """What every candidate is scored against: the prompts, the layers read, the positions and
    the unedited means there ((layers, positions, d_model) each)."""

    positive_prompts: Sequence[Sequence[int]]
    negative_prompts: Sequence[Sequence[int]]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    positive_mean: torch.Tensor
    negative_mean: torch.Tensor


def _means(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    positions: Sequence[int],
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
) -> torch.Tensor:
    """(len(layers), positions, d_model) float64 mean over ``prompts`` of each block input."""
    hooks = [_hook(layer) for layer in layers]
    result = forward(
        handle,
        prompts,
        interventions=interventions,
        hooks=hooks,
        positions=tuple(positions),
        batch_size=batch_size,
    )
    means = []
    for hook in hooks:
        rows = result.activations[hook]
        assert isinstance(rows, torch.Tensor)  # (prompts, positions, d_model)
        means.append(rows.double().mean(0))
    return torch.stack(means)


def cosmic_reference(
    handle: ModelHandle,
    positive_prompts: Sequence[Sequence[int]],
    negative_prompts: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    fraction: float = 0.1,
    batch_size: int = 16,
) -> CosmicReference:
    """The layers COSMIC reads (:func:`low_similarity_layers` of the unedited means over every
    layer) and the unedited means there."""
    positive, negative = (
        collect(handle, prompts, positions, batch_size=batch_size)[0].double().mean(0)
        for prompts in (positive_prompts, negative_prompts)
    )
    layers = low_similarity_layers(positive, negative, fraction=fraction)
    return CosmicReference(
        positive_prompts,
        negative_prompts,
        layers,
        tuple(positions),
        positive[list(layers)],
        negative[list(layers)],
    )


def cosmic_score(
    handle: ModelHandle, candidate: Candidate, reference: CosmicReference, *, batch_size: int = 16
) -> float:
    """cos(positive prompts' mean with the candidate ablated, negative prompts' mean) +
    cos(negative prompts' mean with it added, positive prompts' mean), averaged over the
    reference's layers and positions (at most 2; higher is better)."""
    ablated = _means(
        handle,
        reference.positive_prompts,
        reference.layers,
        reference.positions,
        [candidate.ablation()],
        batch_size,
    )
    added = _means(
        handle,
        reference.negative_prompts,
        reference.layers,
        reference.positions,
        [candidate.addition()],
        batch_size,
    )
    toward_negative = torch.cosine_similarity(ablated, reference.negative_mean, dim=-1)
    toward_positive = torch.cosine_similarity(added, reference.positive_mean, dim=-1)
    return float((toward_negative + toward_positive).mean())
