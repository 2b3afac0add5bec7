"""Heretic-style ablation kernels, searched with Optuna (multi-objective TPE).

A kernel gives each layer an ablation weight, separately for attention and MLP outputs::

    w_l = max_weight + (|l - peak| / width) * (min_weight - max_weight)   if |l - peak| <= width
    w_l = 0                                                               otherwise

The direction is chosen by a fractional ``direction_index``: the unit mean-difference directions
of the two neighbouring layers (read at the last prompt token) are interpolated linearly.

Two objectives are minimised on validation data: the *refusal* objective (mean refusal
probability ``p_R`` on positive prompts; for pairs, the mean log-prob margin of the positive
reply) and the first-token KL on negative prompts. The study lives in an sqlite file, so a second
run with the same storage resumes it; the Pareto front (``study.best_trials``) is written to
``OUT/front.json`` and the per-layer directions to ``OUT/directions/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import save_vector
from steer.directions.api import Prepared, prepare
from steer.directions.methods import get_method
from steer.directions.recipe import Recipe, RecipeKind
from steer.directions.scores import refusal_scores_from_logits, refusal_token_ids
from steer.directions.search import collect, kl_scorer
from steer.errors import InvalidArgumentError
from steer.hooks import HookKind
from steer.interventions import Ablate, Intervention
from steer.models import ModelHandle
from steer.vectors import SteeringVector


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights peaking at ``peak`` and falling to ``min_weight`` at
    distance ``width`` (0 beyond)."""

    max_weight: float
    peak: float
    min_weight: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise InvalidArgumentError("kernel width must be > 0", field="width")

    def weights(self, num_layers: int) -> dict[int, float]:
        out = {}
        for layer in range(num_layers):
            distance = abs(layer - self.peak)
            if distance <= self.width:
                out[layer] = self.max_weight + (distance / self.width) * (
                    self.min_weight - self.max_weight
                )
        return out


def interpolate(directions: SteeringVector, index: float) -> torch.Tensor:
    """Unit direction at fractional layer ``index`` (linear between neighbouring layers)."""
    layers = directions.layers
    if not layers[0] <= index <= layers[-1]:
        raise InvalidArgumentError(
            f"direction index {index} outside layers {layers[0]}..{layers[-1]}",
            field="direction_index",
        )
    low = max(layer for layer in layers if layer <= index)
    high = min(layer for layer in layers if layer >= index)
    unit_low = directions.at(low) / directions.at(low).norm()
    if high == low:
        return unit_low
    unit_high = directions.at(high) / directions.at(high).norm()
    share = (index - low) / (high - low)
    mixed = (1 - share) * unit_low + share * unit_high
    return mixed / mixed.norm()


def kernel_interventions(
    direction: torch.Tensor, attention: Kernel, mlp: Kernel, num_layers: int
) -> tuple[Intervention, ...]:
    vector = SteeringVector.from_shared(direction, name="kernel")
    return (
        Ablate(vector, layer_weights=attention.weights(num_layers), kinds=(HookKind.ATTN_OUT,)),
        Ablate(vector, layer_weights=mlp.weights(num_layers), kinds=(HookKind.MLP_OUT,)),
    )


def layer_directions(handle: ModelHandle, prepared: Prepared) -> SteeringVector:
    """Mean-difference (or the recipe's method) direction of every layer at the last token."""
    batch = prepared.recipe.search.batch_size
    if prepared.recipe.kind is RecipeKind.PAIRS:
        from steer.directions.api import _pair_activations

        positive, negative = _pair_activations(handle, prepared, batch)
    else:
        positive, _ = collect(handle, prepared.positive_train, (-1,), batch_size=batch)
        negative, _ = collect(handle, prepared.negative_train, (-1,), batch_size=batch)
    method = get_method(prepared.recipe.search.method)
    directions = {}
    for layer in range(handle.num_layers):
        difference = method(positive[:, layer, 0], negative[:, layer, 0])
        if difference.norm() > 0 and torch.isfinite(difference).all():
            directions[layer] = difference
    return SteeringVector(per_layer=directions, name="layer-directions")


def _objective_scorer(
    handle: ModelHandle, prepared: Prepared
) -> Callable[[Sequence[Intervention]], float]:
    batch = prepared.recipe.search.batch_size
    if prepared.recipe.kind is RecipeKind.PAIRS:
        from steer.directions.api import _pair_scorers

        margin, _ = _pair_scorers(handle, prepared)
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
    recipe: Recipe,
    out_dir: Path,
    *,
    trials: int,
    storage: Path | None = None,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``trials`` more trials of the study in ``storage``; return the Pareto front."""
    import optuna

    if trials < 0:
        raise InvalidArgumentError("must be >= 0", field="trials")
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or out_dir / "study.db"
    prepared = prepare(handle, recipe)
    directions = layer_directions(handle, prepared)
    score = _objective_scorer(handle, prepared)
    kl = kl_scorer(handle, prepared.negative_validation, recipe.search.batch_size)
    num_layers = handle.num_layers
    layers = directions.layers
    low_index = max(float(layers[0]), 0.4 * (num_layers - 1))
    high_index = min(float(layers[-1]), 0.9 * (num_layers - 1))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        index = trial.suggest_float("direction_index", low_index, max(high_index, low_index))
        kernels = {}
        for part in ("attention", "mlp"):
            max_weight = trial.suggest_float(f"{part}_max_weight", 0.8, 1.5)
            kernels[part] = Kernel(
                max_weight=max_weight,
                peak=trial.suggest_float(f"{part}_peak", 0.6 * (num_layers - 1), num_layers - 1),
                min_weight=max_weight * trial.suggest_float(f"{part}_min_fraction", 0.0, 1.0),
                width=trial.suggest_float(f"{part}_width", 1.0, max(1.0, 0.6 * num_layers)),
            )
        interventions = kernel_interventions(
            interpolate(directions, index), kernels["attention"], kernels["mlp"], num_layers
        )
        values = score(interventions), kl(interventions)
        if progress:
            done = trial.number + 1
            progress(f"trial {trial.number}: score {values[0]:.3f}, kl {values[1]:.4f}", done)
        return values

    study = optuna.create_study(
        study_name=recipe.name,
        storage=f"sqlite:///{storage}",
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=seed + len(_existing(storage, recipe.name))),
        load_if_exists=True,
    )
    if trials:
        study.optimize(objective, n_trials=trials)
    front = [
        {"trial": t.number, "score": t.values[0], "kl": t.values[1], "params": t.params}
        for t in sorted(study.best_trials, key=lambda t: t.values[0])
    ]
    save_vector(
        out_dir / "directions",
        directions,
        handle=handle,
        kind="direction",
        hooks=[f"blocks.{layer}.hook_resid_pre" for layer in directions.layers],
        positions=[-1],
        method=recipe.search.method,
        recipe=recipe.to_dict(),
    )
    (out_dir / "front.json").write_text(
        json.dumps({"trials": len(study.trials), "front": front}, indent=2)
    )
    return front


def kernels_from_params(params: dict[str, float], num_layers: int) -> tuple[float, Kernel, Kernel]:
    """(direction_index, attention kernel, MLP kernel) from a trial's parameters."""
    kernels = []
    for part in ("attention", "mlp"):
        max_weight = params[f"{part}_max_weight"]
        kernels.append(
            Kernel(
                max_weight=max_weight,
                peak=params[f"{part}_peak"],
                min_weight=max_weight * params[f"{part}_min_fraction"],
                width=params[f"{part}_width"],
            )
        )
    return params["direction_index"], kernels[0], kernels[1]


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


__all__ = [
    "Kernel",
    "interpolate",
    "kernel_interventions",
    "kernels_from_params",
    "layer_directions",
    "optimize",
]
