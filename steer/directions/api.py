"""``compute``: make a direction from a recipe and save it as an artifact.

The pipeline reads as its steps::

    load data -> split -> encode -> collect (+ filter) -> candidates -> score -> select -> save

A steering recipe (kind ``steering``) has no search; it goes to
:func:`steer.directions.steering.compute_vector` (read -> vector -> normalise -> sweep -> save).

``compute`` is what the gRPC server and ``steer directions compute`` call. It reports progress
through ``progress(message, fraction)``, checks ``cancelled`` between steps and candidates, and
writes nothing until the search is done (the artifact files are replaced atomically).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer.activations import encode_chat, post_instruction_positions
from steer.artifacts import save_vector
from steer.directions import data as datasets
from steer.directions.methods import get_method, shrink
from steer.directions.recipe import Recipe, RecipeKind, load_recipe
from steer.directions.scores import (
    continuation_logprobs,
    next_token_logits,
    refusal_scores_from_logits,
    refusal_token_ids,
)
from steer.directions.search import (
    SearchResult,
    candidate_layers,
    collect,
    kl_scorer,
    make_candidates,
    passes_filters,
    prompt_scorer,
    score_candidates,
    select,
    token_covariances,
    write_plot,
    write_table,
)
from steer.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from steer.interventions import Intervention
from steer.models import ModelHandle

Progress = Callable[[str, float], None]

#: position label of pair candidates: the mean over the reply's last tokens
REPLY = 0
#: at most this many reply tokens (from the end) are averaged for pair activations
MAX_REPLY_TOKENS = 32


@dataclass(frozen=True)
class Prepared:
    """Encoded train and validation data of one recipe."""

    recipe: Recipe
    positive_train: list[list[int]]
    negative_train: list[list[int]]
    positive_validation: list[list[int]]
    negative_validation: list[list[int]]
    #: pairs only: reply token ids aligned with the train / validation prompts
    positive_replies: tuple[list[list[int]], list[list[int]]] = ([], [])
    negative_replies: tuple[list[list[int]], list[list[int]]] = ([], [])
    hashes: Mapping[str, str] | None = None


def compute(
    handle: ModelHandle,
    recipe_path_or_dict: str | Path | Mapping[str, Any] | Recipe,
    out_dir: str | Path,
    *,
    progress: Progress,
    cancelled: threading.Event,
) -> Path:
    """Run the recipe on ``handle`` and save the chosen direction to ``out_dir``."""
    recipe = (
        recipe_path_or_dict
        if isinstance(recipe_path_or_dict, Recipe)
        else load_recipe(recipe_path_or_dict)
    )

    def check() -> None:
        if cancelled.is_set():
            raise CancelledError("direction computation cancelled", field="recipe")

    if recipe.is_steering:
        from steer.directions.steering import compute_vector

        return compute_vector(handle, recipe, Path(out_dir), progress=progress, check=check)
    progress("loading data", 0.0)
    prepared = prepare(handle, recipe)
    check()
    result = search(handle, prepared, progress=progress, check=check)
    check()
    progress("saving", 0.99)
    path = save(handle, prepared, result, Path(out_dir))
    progress(f"selected {result.selected.label}", 1.0)
    return path


def prepare(handle: ModelHandle, recipe: Recipe) -> Prepared:
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
    positive = datasets.load_prompts(
        data.positive, column=data.positive_column or None, field="data.positive", base=recipe.base
    )
    negative = datasets.load_prompts(
        data.negative, column=data.negative_column or None, field="data.negative", base=recipe.base
    )
    sets = []
    for items in (positive, negative):
        prompt_splits = datasets.split(
            items, seed=data.seed, train=data.train, validation=data.validation, field="data"
        )
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
        hashes={
            "positive": datasets.content_hash(positive),
            "negative": datasets.content_hash(negative),
        },
    )


def _prepare_pairs(handle: ModelHandle, recipe: Recipe) -> Prepared:
    """Load, split, cap and encode a pairs recipe's data (prompts and both replies)."""
    data = recipe.data
    system = data.system or None
    pairs = datasets.load_pairs(
        data.pairs,
        prompt_key=data.prompt_key,
        positive_key=data.positive_key,
        negative_key=data.negative_key,
        field="data.pairs",
        base=recipe.base,
    )
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


def search(
    handle: ModelHandle,
    prepared: Prepared,
    *,
    progress: Progress,
    check: Callable[[], None] = lambda: None,
) -> SearchResult:
    """Collect activations, build candidates, score them and select one."""
    recipe = prepared.recipe
    options = recipe.search
    layers = candidate_layers(
        handle.num_layers, options.layers, options.min_layer_fraction, options.max_layer_fraction
    )
    notes: list[str] = []
    collected = _collect(handle, prepared, progress=progress, check=check, notes=notes)
    method = get_method(options.method)
    if method.uses_covariance:
        progress("harmless token covariance", 0.08)
    covariances = whitening_covariances(handle, recipe, collected.negative_prompts)
    check()
    progress("building candidates", 0.1)
    candidates = make_candidates(
        method,
        collected.positive,
        collected.negative,
        layers=layers,
        positions=collected.positions,
        per_layer=options.per_layer,
        covariances=covariances,
        # layers the recipe (or --layers) names bound the per-layer candidate as well
        per_layer_layers=layers if options.layers else None,
    )
    result = _score(handle, recipe, collected, candidates, progress=progress, check=check)
    result.layers = layers
    result.notes[:0] = notes
    return result


def _score(
    handle: ModelHandle,
    recipe: Recipe,
    collected: _Collected,
    candidates: list[Any],
    *,
    progress: Progress,
    check: Callable[[], None],
) -> SearchResult:
    """Score the candidates on validation data and select one (see steer.directions.search)."""
    options = recipe.search
    kl = kl_scorer(handle, collected.negative_validation, options.batch_size)
    baseline_positive = float(collected.positive_score(()).mean())
    baseline_negative = float(collected.negative_score(()).mean())

    def passes(candidate: Any) -> bool:
        return passes_filters(
            candidate,
            kl_threshold=options.kl_threshold,
            require_induce=options.require_induce,
            induce_floor=baseline_negative,
        )

    scored = score_candidates(
        candidates,
        positive_score=collected.positive_score,
        negative_score=collected.negative_score,
        negative_kl=kl,
        top_k=options.top_k,
        passes=passes,
        progress=lambda message, fraction: progress(message, 0.1 + 0.88 * fraction),
        check=check,
    )
    selected, passed = select(
        scored,
        kl_threshold=options.kl_threshold,
        require_induce=options.require_induce,
        induce_floor=baseline_negative,
    )
    notes = [] if passed else ["no candidate passed the KL/induce filters; kept the lowest bypass"]
    return SearchResult(
        candidates=scored,
        selected=selected,
        passed=passed,
        baseline_positive=baseline_positive,
        baseline_negative=baseline_negative,
        layers=(),
        positions=tuple(collected.positions),
        notes=notes,
    )


@dataclass(frozen=True)
class _Collected:
    """Train activations and validation scorers of one recipe (see :func:`_collect`)."""

    positions: tuple[int, ...]
    #: (n, num_layers, len(positions), d_model) per side
    positive: torch.Tensor
    negative: torch.Tensor
    positive_score: Any
    negative_score: Any
    negative_validation: list[list[int]]
    #: harmless train prompts kept by the filter (whitening reads all their tokens)
    negative_prompts: list[list[int]]


def _collect(
    handle: ModelHandle,
    prepared: Prepared,
    *,
    progress: Progress,
    check: Callable[[], None],
    notes: list[str],
) -> _Collected:
    """Activations of the (filtered) train data and the scorers of the validation data."""
    recipe = prepared.recipe
    batch = recipe.search.batch_size
    if recipe.kind is RecipeKind.PAIRS:
        positive, negative = pair_activations(handle, prepared, batch)
        positive_score, negative_score = _pair_scorers(handle, prepared)
        return _Collected(
            (REPLY,),
            positive,
            negative,
            positive_score,
            negative_score,
            prepared.positive_validation,
            prepared.negative_train,
        )
    positions = tuple(recipe.search.positions or post_instruction_positions(handle))
    progress("collecting activations", 0.02)
    positive, negative, negative_prompts = filtered_train_activations(
        handle, prepared, positions, progress=progress, check=check, notes=notes
    )
    token_ids = refusal_token_ids(handle.tokenizer)
    positive_validation = prepared.positive_validation
    if _filters(recipe):
        refused_validation = _refusals(handle, recipe, positive_validation, token_ids, batch)
        positive_validation = _filter_validation(positive_validation, refused_validation, notes)
    return _Collected(
        positions,
        positive,
        negative,
        prompt_scorer(handle, positive_validation, token_ids, batch),
        prompt_scorer(handle, prepared.negative_validation, token_ids, batch),
        prepared.negative_validation,
        negative_prompts,
    )


def save(handle: ModelHandle, prepared: Prepared, result: SearchResult, out_dir: Path) -> Path:
    """Write the sweep (CSV + PNG) and the direction artifact."""
    recipe = prepared.recipe
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, writer in (("sweep.csv", write_table), ("sweep.png", _plot_writer(recipe))):
        stem, suffix = name.split(".")
        temporary = out_dir / f".{stem}.tmp.{suffix}"
        writer(temporary, result)
        os.replace(temporary, out_dir / name)
    selected = result.selected
    metrics = {
        "bypass": selected.bypass,
        "induce": None if math.isnan(selected.induce) else selected.induce,
        "kl_first_token_validation": None if math.isnan(selected.kl) else selected.kl,
        "baseline_positive": result.baseline_positive,
        "baseline_negative": result.baseline_negative,
        "passed_filters": result.passed,
    }
    return save_vector(
        out_dir,
        selected.vector,
        handle=handle,
        kind="direction",
        hooks=list(selected.hooks),
        positions=[selected.position] if recipe.kind is not RecipeKind.PAIRS else "reply",
        method=recipe.search.method,
        layer=selected.layer,
        data={
            **(prepared.hashes or {}),
            "seed": recipe.data.seed,
            "train": [len(prepared.positive_train), len(prepared.negative_train)],
            "validation": [len(prepared.positive_validation), len(prepared.negative_validation)],
        },
        metrics=metrics,
        recipe=recipe.to_dict(),
        notes=result.notes,
        sweep={"table": "sweep.csv", "plot": "sweep.png"},
    )


def interventions_for(
    vector_artifact: Any, *, strength: float | None = None
) -> tuple[Intervention, ...]:
    """Ablation of an artifact's direction, or activation addition at its hooks with
    ``strength`` (negative strengths push away from the direction)."""
    from steer.directions.search import ablation
    from steer.interventions import Add

    if strength is None:
        return (ablation(vector_artifact.vector),)
    hooks = tuple(vector_artifact.metadata.get("hooks") or ())
    return (Add(vector_artifact.vector, strength, hooks=hooks),)


# ---------------------------------------------------------------------------------------------


def _cap(items: Sequence[Any], cap: int) -> list[Any]:
    return list(items[:cap]) if cap else list(items)


def _reply_ids(handle: ModelHandle, reply: str) -> list[int]:
    ids = list(handle.tokenizer(reply, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FailedPreconditionError("empty reply in pairs data", field="data.pairs")
    return ids


def _refusals(
    handle: ModelHandle,
    recipe: Recipe,
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
    refused = _refusals(handle, recipe, prepared.positive_train, token_ids, batch)
    return refused, ~_refusals(handle, recipe, prepared.negative_train, token_ids, batch)


#: a refusal filter that keeps fewer prompts of a set than this is ignored for that set (a
#: mean needs some prompts; one or none would make the direction noise)
MIN_KEPT = 2


def _filters(recipe: Recipe) -> bool:
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
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(positive, negative, negative prompts) of a prompt recipe's train split at ``positions``:
    activations (n, num_layers, len(positions), d_model) and the harmless prompts kept, after the
    refusal filter when the recipe asks for it. The search, ``steer directions optimize`` and
    scripts/sweep_whitening.py all collect their train activations here."""
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
    negative_prompts = prepared.negative_train
    if _filters(recipe):
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


def kept_prompts(prompts: list[list[int]], keep: torch.Tensor) -> list[list[int]]:
    """The prompts a train filter keeps, by the rule of ``_filter_train`` (all if too few)."""
    if int(keep.sum()) < MIN_KEPT:
        return prompts
    return [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]


def whitening_covariances(
    handle: ModelHandle, recipe: Recipe, negative_prompts: Sequence[Sequence[int]]
) -> torch.Tensor | None:
    """Shrunk per-layer token covariances of the negative prompts when the recipe's method
    whitens (``whitened``) and the recipe contrasts prompts; None otherwise (paired replies
    whiten by the rows the method is given)."""
    if not get_method(recipe.search.method).uses_covariance or recipe.kind is RecipeKind.PAIRS:
        return None
    covariances = token_covariances(handle, negative_prompts, batch_size=recipe.search.batch_size)
    return shrink(covariances, recipe.search.shrinkage)


def _filter_validation(
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


def _pair_scorers(handle: ModelHandle, prepared: Prepared) -> tuple[Any, Any]:
    """Score = per-token log-prob margin of the positive reply over the negative one."""
    prompts = prepared.positive_validation
    positive, negative = prepared.positive_replies[1], prepared.negative_replies[1]

    def margin(interventions: Sequence[Intervention]) -> torch.Tensor:
        return continuation_logprobs(handle, prompts, positive, interventions) - (
            continuation_logprobs(handle, prompts, negative, interventions)
        )

    return margin, margin


def _plot_writer(recipe: Recipe) -> Callable[[Path, SearchResult], Path]:
    def writer(path: Path, result: SearchResult) -> Path:
        return write_plot(path, result, title=f"{recipe.name}: {recipe.search.method}")

    return writer


def held_out(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The recipe's test prompts: (positive, negative); for pairs, (situations, situations)."""
    data = recipe.data
    if recipe.is_steering:
        raise InvalidArgumentError(
            "a steering recipe keeps no held-out test split; measure a steering vector with "
            "steer directions sweep",
            field="recipe",
        )
    if recipe.kind is RecipeKind.PAIRS:
        pairs = datasets.load_pairs(
            data.pairs,
            prompt_key=data.prompt_key,
            positive_key=data.positive_key,
            negative_key=data.negative_key,
            field="data.pairs",
            base=recipe.base,
        )
        test = datasets.split(pairs, seed=data.seed, train=data.train, validation=data.validation)
        situations = [pair.prompt for pair in test.test]
        return situations, situations
    out = []
    for source, column, name in (
        (data.positive, data.positive_column, "data.positive"),
        (data.negative, data.negative_column, "data.negative"),
    ):
        items = datasets.load_prompts(source, column=column or None, field=name, base=recipe.base)
        out.append(
            list(
                datasets.split(
                    items, seed=data.seed, train=data.train, validation=data.validation
                ).test
            )
        )
    return out[0], out[1]
