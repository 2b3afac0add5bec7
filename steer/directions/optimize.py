"""Heretic-style ablation kernels, searched with Optuna (multi-objective TPE).

A trial is an edit recipe (:mod:`steer.recipes`, the schema ``steer bake`` reads): one ``ablate``
edit with a kernel of per-layer weights for the attention outputs and another for the MLP
outputs (:class:`steer.recipes.Kernel`)::

    w_l = max_weight + (|l - peak_layer| / width) * (min_weight - max_weight)   within width
    w_l = 0                                                                     otherwise

and a fractional ``direction_layer``: the unit per-layer directions (mean difference at the last
prompt token, refused / answered prompts only) of the two neighbouring layers are interpolated.
Trials are lowered to interventions by :meth:`steer.recipes.EditRecipe.lowered`, the same path
the run-time engine and the bake use, so a front entry means the same thing everywhere.

Two objectives are minimised on validation data: the *refusal* objective (mean refusal
probability ``p_R`` on positive prompts; for pairs, the mean log-prob margin of the positive
reply) and the first-token KL on negative prompts. The study lives in an sqlite file, so a second
run with the same storage resumes it. Written to ``OUT``: ``front.json`` (the Pareto front,
``study.best_trials``), ``directions/`` (the per-layer directions) and ``recipes/trial-N.toml``,
one edit recipe per front entry, ready for ``steer eval refusal --edits`` and ``steer bake
--recipe``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import load_vector, save_vector
from steer.directions.methods import get_method
from steer.directions.pipeline import (
    Prepared,
    filtered_train_activations,
    pair_activations,
    pair_scorers,
    prepare,
    whitening_covariances,
)
from steer.directions.recipe import DirectionRecipe, RecipeKind
from steer.directions.scores import refusal_scores_from_logits, refusal_token_ids
from steer.directions.search import kl_scorer
from steer.errors import InvalidArgumentError
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.recipes import AblateEdit, EditRecipe, Kernel, recipe_to_toml
from steer.vectors import SteeringVector


def trial_recipe(params: dict[str, float], directions: Path, *, name: str = "") -> EditRecipe:
    """The edit recipe of one trial's parameters (see :func:`optimize` for their names)."""
    kernels = []
    for part in ("attention", "mlp"):
        max_weight = params[f"{part}_max_weight"]
        kernels.append(
            Kernel(
                max_weight=max_weight,
                min_weight=max_weight * params[f"{part}_min_fraction"],
                peak_layer=params[f"{part}_peak"],
                width=params[f"{part}_width"],
            )
        )
    edit = AblateEdit(
        direction=str(directions),
        kernel=kernels[0],
        mlp_kernel=kernels[1],
        direction_layer=params["direction_index"],
        embedding_weight=0.0,
    )
    return EditRecipe(
        edits=(edit,),
        name=name,
        description="heretic-style kernel ablation from `steer directions optimize`",
    )


def layer_directions(handle: ModelHandle, prepared: Prepared) -> SteeringVector:
    """Mean-difference (or the recipe's method) direction of every layer at the last token."""
    batch = prepared.recipe.search.batch_size
    covariances = None
    if prepared.recipe.kind is RecipeKind.PAIRS:
        positive, negative = pair_activations(handle, prepared, batch)
    else:
        positive, negative, negative_prompts = filtered_train_activations(handle, prepared, (-1,))
        covariances = whitening_covariances(handle, prepared.recipe, negative_prompts)
    method = get_method(prepared.recipe.search.method)
    directions = {}
    for layer in range(handle.num_layers):
        covariance = None if covariances is None else covariances[layer]
        difference = method(positive[:, layer, 0], negative[:, layer, 0], covariance)
        if difference.norm() > 0 and torch.isfinite(difference).all():
            directions[layer] = difference
    return SteeringVector(per_layer=directions, name="layer-directions")


def _objective_scorer(
    handle: ModelHandle, prepared: Prepared
) -> Callable[[Sequence[Intervention]], float]:
    batch = prepared.recipe.search.batch_size
    if prepared.recipe.kind is RecipeKind.PAIRS:
        margin, _ = pair_scorers(handle, prepared)
        return lambda interventions: float(margin(interventions).mean())
    from steer.directions.scores import next_token_logits

    token_ids = refusal_token_ids(handle.tokenizer)
    prompts = prepared.positive_validation

    def refusal_probability(interventions: Sequence[Intervention]) -> float:
        logits = next_token_logits(handle, prompts, interventions, batch_size=batch)
        return float(torch.sigmoid(refusal_scores_from_logits(logits, token_ids)).mean())

    return refusal_probability


def optimize(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    out_dir: Path,
    *,
    trials: int,
    storage: Path | None = None,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``trials`` more trials of the study in ``storage``; return the Pareto front.

    Steps: prepare the data -> per-layer directions (saved) -> objectives -> study -> front.
    """
    import optuna

    if trials < 0:
        raise InvalidArgumentError("must be >= 0", field="trials")
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or out_dir / "study.db"
    prepared = prepare(handle, recipe)
    directions_dir = _save_directions(handle, prepared, out_dir / "directions")
    objective = _objective(handle, prepared, directions_dir, progress)
    study = optuna.create_study(
        study_name=recipe.name,
        storage=f"sqlite:///{storage}",
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=seed + len(_existing(storage, recipe.name))),
        load_if_exists=True,
    )
    if trials:
        study.optimize(objective, n_trials=trials)
    return _write_front(study, recipe, directions_dir, out_dir)


def _save_directions(handle: ModelHandle, prepared: Prepared, directory: Path) -> Path:
    """The per-layer directions (:func:`layer_directions`), saved as an artifact."""
    recipe = prepared.recipe
    vector = layer_directions(handle, prepared)
    return save_vector(
        directory,
        vector,
        handle=handle,
        kind="direction",
        hooks=[f"blocks.{layer}.hook_resid_pre" for layer in vector.layers],
        positions=[-1],
        method=recipe.search.method,
        recipe=recipe.to_dict(),
    )


def _objective(
    handle: ModelHandle,
    prepared: Prepared,
    directions_dir: Path,
    progress: Callable[[str, float], None] | None,
) -> Callable[[Any], tuple[float, float]]:
    """The study's objective: a trial's (score, first-token KL), both minimised."""
    artifact = load_vector(directions_dir, handle=handle)
    score = _objective_scorer(handle, prepared)
    kl = kl_scorer(handle, prepared.negative_validation, prepared.recipe.search.batch_size)
    num_layers = handle.num_layers
    layers = artifact.vector.layers
    low_index = max(float(layers[0]), 0.4 * (num_layers - 1))
    high_index = min(float(layers[-1]), 0.9 * (num_layers - 1))

    def objective(trial: Any) -> tuple[float, float]:
        params = _suggest(trial, num_layers, low_index, max(high_index, low_index))
        interventions = trial_recipe(params, directions_dir).lowered(
            num_layers, load=lambda _path: artifact
        )
        values = score(interventions), kl(interventions)
        if progress:
            done = trial.number + 1
            progress(f"trial {trial.number}: score {values[0]:.3f}, kl {values[1]:.4f}", done)
        return values

    return objective


def _suggest(trial: Any, num_layers: int, low_index: float, high_index: float) -> dict[str, float]:
    """One trial's parameters (see :func:`trial_recipe`), drawn from the study's sampler."""
    params = {"direction_index": trial.suggest_float("direction_index", low_index, high_index)}
    for part in ("attention", "mlp"):
        params[f"{part}_max_weight"] = trial.suggest_float(f"{part}_max_weight", 0.8, 1.5)
        params[f"{part}_peak"] = trial.suggest_float(
            f"{part}_peak", 0.6 * (num_layers - 1), num_layers - 1
        )
        params[f"{part}_min_fraction"] = trial.suggest_float(f"{part}_min_fraction", 0.0, 1.0)
        params[f"{part}_width"] = trial.suggest_float(
            f"{part}_width", 1.0, max(1.0, 0.6 * num_layers)
        )
    return params


def _write_front(
    study: Any, recipe: DirectionRecipe, directions_dir: Path, out_dir: Path
) -> list[dict[str, Any]]:
    """Write ``recipes/trial-N.toml`` per front entry and ``front.json``; return the front."""
    recipes_dir = out_dir / "recipes"
    recipes_dir.mkdir(exist_ok=True)
    front = []
    for t in sorted(study.best_trials, key=lambda t: t.values[0]):
        path = recipes_dir / f"trial-{t.number}.toml"
        name = f"{recipe.name}-trial-{t.number}"
        path.write_text(recipe_to_toml(trial_recipe(t.params, directions_dir, name=name)))
        front.append(
            {
                "trial": t.number,
                "score": t.values[0],
                "kl": t.values[1],
                "params": t.params,
                "recipe": str(path),
            }
        )
    (out_dir / "front.json").write_text(
        json.dumps({"trials": len(study.trials), "front": front}, indent=2)
    )
    return front


def _existing(storage: Path, name: str) -> list[Any]:
    """Trials already stored (so a resumed run seeds its sampler differently)."""
    if not storage.exists():
        return []
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")
    except KeyError:
        return []
    return list(study.trials)


__all__ = ["layer_directions", "optimize", "trial_recipe"]
