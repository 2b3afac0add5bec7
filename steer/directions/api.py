"""``compute``: make a direction from a recipe and save it as an artifact.

The pipeline reads as its steps::

    load data -> split -> encode -> collect (+ filter) -> candidates -> score -> select -> save

A steering recipe (kind ``steering``) has no search; it goes to
:func:`steer.directions.steering.compute_vector` (read -> vector -> normalise -> sweep -> save).

``compute`` is what the gRPC server and ``steer directions compute`` call. It reports progress
through ``progress(message, fraction)``, checks ``cancelled`` between steps and candidates, and
writes nothing until the search is done (the artifact files are replaced atomically). The
steps other tools reuse (prepared data, the refusal filter, pair scorers, whitening) are public
in :mod:`steer.directions.pipeline`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import VectorArtifact, save_vector
from steer.directions import data as datasets
from steer.directions.methods import get_method
from steer.directions.pipeline import (
    Prepared,
    TrainReads,
    filter_validation,
    filtered_train_activations,
    pair_activations,
    pair_scorers,
    prepare,
    refusals,
    uses_filter,
    whitening_covariances,
)
from steer.directions.recipe import DirectionRecipe, RecipeKind, load_direction_recipe
from steer.directions.scores import refusal_token_ids
from steer.directions.search import (
    SearchResult,
    candidate_layers,
    kl_scorer,
    make_candidates,
    passes_filters,
    prompt_scorer,
    score_candidates,
    select,
    write_plot,
    write_table,
)
from steer.errors import CancelledError, InvalidArgumentError
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.text import post_instruction_positions

Progress = Callable[[str, float], None]

#: position label of pair candidates: the mean over the reply's last tokens
REPLY = 0


def compute(
    handle: ModelHandle,
    recipe_path_or_dict: str | Path | Mapping[str, Any] | DirectionRecipe,
    out_dir: str | Path,
    *,
    progress: Progress,
    cancelled: threading.Event,
    reads: TrainReads | None = None,
) -> Path:
    """Run the recipe on ``handle`` and save the chosen direction to ``out_dir``; with
    ``reads``, a prompt recipe's train prompts' last-token block inputs go into it (a gate
    calibrated next reads its train prompts from there: ``steer directions gate --compute``)."""
    recipe = (
        recipe_path_or_dict
        if isinstance(recipe_path_or_dict, DirectionRecipe)
        else load_direction_recipe(recipe_path_or_dict)
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
    result = search(handle, prepared, progress=progress, check=check, reads=reads)
    check()
    progress("saving", 0.99)
    path = save(handle, prepared, result, Path(out_dir))
    progress(f"selected {result.selected.label}", 1.0)
    return path


def search(
    handle: ModelHandle,
    prepared: Prepared,
    *,
    progress: Progress,
    check: Callable[[], None] = lambda: None,
    reads: TrainReads | None = None,
) -> SearchResult:
    """Collect activations (keeping the train prompts' last-token reads in ``reads``, as
    :func:`compute`), build candidates, score them and select one."""
    recipe = prepared.recipe
    options = recipe.search
    layers = candidate_layers(
        handle.num_layers, options.layers, options.min_layer_fraction, options.max_layer_fraction
    )
    notes: list[str] = []
    collected = _collect(handle, prepared, progress=progress, check=check, notes=notes, reads=reads)
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
    recipe: DirectionRecipe,
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
        max_checks=options.max_checks or None,
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
    reads: TrainReads | None = None,
) -> _Collected:
    """Activations of the (filtered) train data and the scorers of the validation data."""
    recipe = prepared.recipe
    batch = recipe.search.batch_size
    if recipe.kind is RecipeKind.PAIRS:
        positive, negative = pair_activations(handle, prepared, batch)
        positive_score, negative_score = pair_scorers(handle, prepared)
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
        handle, prepared, positions, progress=progress, check=check, notes=notes, reads=reads
    )
    token_ids = refusal_token_ids(handle.tokenizer)
    positive_validation = prepared.positive_validation
    if uses_filter(recipe):
        refused_validation = refusals(handle, recipe, positive_validation, token_ids, batch)
        positive_validation = filter_validation(positive_validation, refused_validation, notes)
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
    vector_artifact: VectorArtifact, *, strength: float | None = None
) -> tuple[Intervention, ...]:
    """Ablation of an artifact's direction, or activation addition at its hooks with
    ``strength`` (negative strengths push away from the direction)."""
    if strength is None:
        return (vector_artifact.ablation(),)
    return (vector_artifact.addition(strength),)


def _plot_writer(recipe: DirectionRecipe) -> Callable[[Path, SearchResult], Path]:
    def writer(path: Path, result: SearchResult) -> Path:
        return write_plot(path, result, title=f"{recipe.name}: {recipe.search.method}")

    return writer


def held_out(recipe: DirectionRecipe) -> tuple[list[str], list[str]]:
    """The recipe's test prompts: (positive, negative); for pairs, (situations, situations)."""
    data = recipe.data
    if recipe.is_steering:
        raise InvalidArgumentError(
            "a steering recipe keeps no held-out test split; measure a steering vector with "
            "steer directions sweep",
            field="recipe",
        )
    if recipe.kind is RecipeKind.PAIRS:
        pairs = datasets.recipe_pairs(recipe)
        test = datasets.split(pairs, seed=data.seed, train=data.train, validation=data.validation)
        situations = [pair.prompt for pair in test.test]
        return situations, situations
    splits = contrast_splits(recipe)
    return list(splits["positive"].test), list(splits["negative"].test)


def contrast_splits(recipe: DirectionRecipe) -> dict[str, datasets.Splits[str]]:
    """A contrast recipe's prompts split as every step splits them: ``{"positive": Splits,
    "negative": Splits}`` (train / validation / test, before any cap or filter). Choices (a
    layer, a weight, a gate's threshold) are made on train and validation only; the recipe's
    ``data.positive_extra`` / ``negative_extra`` join train and validation, never test."""
    if recipe.kind is RecipeKind.PAIRS or recipe.is_steering:
        raise InvalidArgumentError(
            "only a contrast recipe (two prompt sets) has positive and negative splits",
            field="recipe",
        )
    return datasets.contrast_splits(recipe)
