"""The steps of a direction search that other tools reuse, with public names.

Prepared data (load, split, cap, encode), the refusal filter, filtered train activations,
pair activations and scorers, and whitening covariances: :func:`steer.directions.api.compute`
runs them in order, ``steer directions optimize`` and scripts/sweep_whitening.py call them too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steer.directions import data as datasets
from steer.directions.methods import get_method, shrink
from steer.directions.recipe import DirectionRecipe, RecipeKind
from steer.directions.scores import (
    continuation_logprobs,
    next_token_logits,
    refusal_scores_from_logits,
    refusal_token_ids,
)
from steer.directions.search import collect, resid_hooks, token_covariances
from steer.errors import FailedPreconditionError, InvalidArgumentError
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.text import encode_chat

Progress = Callable[[str, float], None]

#: train prompts' last-token block inputs a search keeps for a gate, filled by
#: :func:`filtered_train_activations` (read as :data:`steer.activations.KnownReads`)
TrainReads = dict[tuple[int, ...], dict[str, torch.Tensor]]

#: at most this many reply tokens (from the end) are averaged for pair activations
MAX_REPLY_TOKENS = 32


@dataclass(frozen=True)
class Prepared:
    """Encoded train and validation data of one recipe."""

    recipe: DirectionRecipe
    positive_train: list[list[int]]
    negative_train: list[list[int]]
    positive_validation: list[list[int]]
    negative_validation: list[list[int]]
    #: pairs only: reply token ids aligned with the train / validation prompts
    positive_replies: tuple[list[list[int]], list[list[int]]] = ([], [])
    negative_replies: tuple[list[list[int]], list[list[int]]] = ([], [])
    hashes: Mapping[str, str] | None = None


def prepare(handle: ModelHandle, recipe: DirectionRecipe) -> Prepared:
    """Load, split, cap and encode the recipe's data."""
    if recipe.is_steering:
        raise InvalidArgumentError(
            "a steering recipe is not split or searched; make it with compute "
            "(steer directions compute)",
            field="recipe",
        )
    data = recipe.data
    system = data.system or None
    if recipe.kind is RecipeKind.PAIRS:
        return _prepare_pairs(handle, recipe)
    prompt_sets = datasets.contrast_sets(recipe)
    sets = []
    for prompt_splits in datasets.contrast_splits(recipe, prompt_sets).values():
        sets.append(
            (
                [encode_chat(handle, p, system) for p in _cap(prompt_splits.train, data.max_train)],
                [
                    encode_chat(handle, p, system)
                    for p in _cap(prompt_splits.validation, data.max_validation)
                ],
            )
        )
    return Prepared(
        recipe,
        positive_train=sets[0][0],
        negative_train=sets[1][0],
        positive_validation=sets[0][1],
        negative_validation=sets[1][1],
        hashes={name: datasets.content_hash(items) for name, items in prompt_sets.items()},
    )


def _prepare_pairs(handle: ModelHandle, recipe: DirectionRecipe) -> Prepared:
    """Load, split, cap and encode a pairs recipe's data (prompts and both replies)."""
    data = recipe.data
    system = data.system or None
    pairs = datasets.recipe_pairs(recipe)
    splits = datasets.split(
        pairs, seed=data.seed, train=data.train, validation=data.validation, field="data"
    )
    train = _cap(splits.train, data.max_train)
    validation = _cap(splits.validation, data.max_validation)

    def prompts(items: Sequence[datasets.Pair]) -> list[list[int]]:
        return [encode_chat(handle, pair.prompt, system) for pair in items]

    def replies(items: Sequence[datasets.Pair], side: str) -> list[list[int]]:
        return [_reply_ids(handle, getattr(pair, side)) for pair in items]

    train_prompts, validation_prompts = prompts(train), prompts(validation)
    return Prepared(
        recipe,
        positive_train=train_prompts,
        negative_train=train_prompts,
        positive_validation=validation_prompts,
        negative_validation=validation_prompts,
        positive_replies=(replies(train, "positive"), replies(validation, "positive")),
        negative_replies=(replies(train, "negative"), replies(validation, "negative")),
        hashes={"pairs": datasets.content_hash(pairs)},
    )


def _cap(items: Sequence[Any], cap: int) -> list[Any]:
    return list(items[:cap]) if cap else list(items)


def _reply_ids(handle: ModelHandle, reply: str) -> list[int]:
    ids = list(handle.tokenizer(reply, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FailedPreconditionError("empty reply in pairs data", field="data.pairs")
    return ids


def refusals(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    batch: int,
) -> torch.Tensor:
    """Whether the model refuses each prompt, decided as ``recipe.data.filter_by`` says."""
    if recipe.data.filter_by == "generation":
        from steer.directions.evaluate import generate, is_refusal

        completions = generate(
            handle, prompts, max_new_tokens=recipe.data.filter_tokens, batch_size=batch
        )
        return torch.tensor([is_refusal(text) for _ids, text in completions], dtype=torch.bool)
    logits = next_token_logits(handle, prompts, batch_size=batch)
    return refusal_scores_from_logits(logits, token_ids) > 0


def filter_masks(
    handle: ModelHandle,
    prepared: Prepared,
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    progress: Callable[[str, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(harmful train prompts the model refuses, harmless train prompts it answers), decided
    by the recipe's ``filter_by``; the score filter reads the next-token logits already
    collected with the activations."""
    recipe = prepared.recipe
    token_ids = refusal_token_ids(handle.tokenizer)
    if recipe.data.filter_by == "score":
        refused = refusal_scores_from_logits(positive_logits, token_ids) > 0
        return refused, refusal_scores_from_logits(negative_logits, token_ids) < 0
    if progress is not None:
        progress("filtering by generation", 0.05)
    batch = recipe.search.batch_size
    refused = refusals(handle, recipe, prepared.positive_train, token_ids, batch)
    return refused, ~refusals(handle, recipe, prepared.negative_train, token_ids, batch)


#: a refusal filter that keeps fewer prompts of a set than this is ignored for that set (a
#: mean needs some prompts; one or none would make the direction noise)
MIN_KEPT = 2


def uses_filter(recipe: DirectionRecipe) -> bool:
    return recipe.kind is RecipeKind.REFUSAL and recipe.data.filter


def _filter_train(
    positive: torch.Tensor,
    negative: torch.Tensor,
    keep_positive: torch.Tensor,
    keep_negative: torch.Tensor,
    notes: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep positives the model refuses and negatives it answers (see DataSection.filter_by)."""
    kept = []
    for name, acts, keep in (
        ("positive", positive, keep_positive),
        ("negative", negative, keep_negative),
    ):
        if int(keep.sum()) < MIN_KEPT:
            notes.append(f"filter left {int(keep.sum())} {name} train prompts; kept all")
            kept.append(acts)
        else:
            notes.append(f"filter kept {int(keep.sum())}/{len(keep)} {name} train prompts")
            kept.append(acts[keep])
    return kept[0], kept[1]


def filtered_train_activations(
    handle: ModelHandle,
    prepared: Prepared,
    positions: Sequence[int],
    *,
    progress: Progress | None = None,
    check: Callable[[], None] = lambda: None,
    notes: list[str] | None = None,
    reads: TrainReads | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(positive, negative, negative prompts) of a prompt recipe's train split at ``positions``:
    activations (n, num_layers, len(positions), d_model) and the harmless prompts kept, after the
    refusal filter when the recipe asks for it. The search, ``steer directions optimize`` and
    scripts/sweep_whitening.py all collect their train activations here. With ``reads`` (and
    -1 among ``positions``), every train prompt's last-token block inputs go into it, before the
    filter (:data:`steer.activations.KnownReads`: a gate's train reads, taken from here by
    ``steer directions gate --compute``)."""
    recipe = prepared.recipe
    batch = recipe.search.batch_size
    positive, positive_logits = collect(
        handle, prepared.positive_train, positions, logits=True, batch_size=batch
    )
    check()
    negative, negative_logits = collect(
        handle, prepared.negative_train, positions, logits=True, batch_size=batch
    )
    check()
    if reads is not None and -1 in positions:
        for prompts, acts in (
            (prepared.positive_train, positive),
            (prepared.negative_train, negative),
        ):
            _keep_last(reads, prompts, acts[:, :, list(positions).index(-1)].clone())
    negative_prompts = prepared.negative_train
    if uses_filter(recipe):
        assert positive_logits is not None and negative_logits is not None
        refused, answered = filter_masks(
            handle, prepared, positive_logits, negative_logits, progress
        )
        check()
        positive, negative = _filter_train(
            positive, negative, refused, answered, notes if notes is not None else []
        )
        negative_prompts = kept_prompts(negative_prompts, answered)
    return positive, negative, negative_prompts


def _keep_last(
    reads: TrainReads,
    prompts: Sequence[Sequence[int]],
    last: torch.Tensor,
) -> None:
    """``last`` (prompts, num_layers, d_model): each prompt's block inputs into ``reads``."""
    hooks = resid_hooks(last.shape[1])
    for prompt, layers in zip(prompts, last, strict=True):
        reads[tuple(prompt)] = dict(zip(hooks, layers, strict=True))


def kept_prompts(prompts: list[list[int]], keep: torch.Tensor) -> list[list[int]]:
    """The prompts a train filter keeps, by the rule of ``_filter_train`` (all if too few)."""
    if int(keep.sum()) < MIN_KEPT:
        return prompts
    return [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]


def whitening_covariances(
    handle: ModelHandle, recipe: DirectionRecipe, negative_prompts: Sequence[Sequence[int]]
) -> torch.Tensor | None:
    """Shrunk per-layer token covariances of the negative prompts when the recipe's method
    whitens (``whitened``) and the recipe contrasts prompts; None otherwise (paired replies
    whiten by the rows the method is given)."""
    if not get_method(recipe.search.method).uses_covariance or recipe.kind is RecipeKind.PAIRS:
        return None
    covariances = token_covariances(handle, negative_prompts, batch_size=recipe.search.batch_size)
    return shrink(covariances, recipe.search.shrinkage)


def filter_validation(
    prompts: list[list[int]], refused: torch.Tensor, notes: list[str]
) -> list[list[int]]:
    kept = [p for p, keep in zip(prompts, refused.tolist(), strict=True) if keep]
    if len(kept) < MIN_KEPT:
        notes.append(f"filter left {len(kept)} positive validation prompts; kept all")
        return prompts
    notes.append(f"filter kept {len(kept)}/{len(prompts)} positive validation prompts")
    return kept


def pair_activations(
    handle: ModelHandle, prepared: Prepared, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean activation over the last reply tokens: (n, num_layers, 1, d_model) per side."""
    prompts = prepared.positive_train
    out = []
    for replies in (prepared.positive_replies[0], prepared.negative_replies[0]):
        count = min(MAX_REPLY_TOKENS, *(len(r) for r in replies))
        full = [p + r for p, r in zip(prompts, replies, strict=True)]
        acts, _ = collect(handle, full, tuple(range(-count, 0)), batch_size=batch)
        out.append(acts.mean(dim=2, keepdim=True))
    return out[0], out[1]


def pair_scorers(handle: ModelHandle, prepared: Prepared) -> tuple[Any, Any]:
    """Score = per-token log-prob margin of the positive reply over the negative one."""
    prompts = prepared.positive_validation
    positive, negative = prepared.positive_replies[1], prepared.negative_replies[1]

    def margin(interventions: Sequence[Intervention]) -> torch.Tensor:
        return continuation_logprobs(handle, prompts, positive, interventions) - (
            continuation_logprobs(handle, prompts, negative, interventions)
        )

    return margin, margin
