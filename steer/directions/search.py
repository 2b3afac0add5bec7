"""Candidate search: one direction per (layer, position), scored on validation data.

Steps (Arditi et al. 2024, extended):

1. ``collect``: residual-stream activations ``blocks.L.hook_resid_pre`` of every layer at the
   chosen token positions, for the positive and negative training sets.
2. ``candidates``: one direction per (layer, position) from the recipe's method, plus (optionally)
   one *per-layer* candidate per position: every layer ablated with its own direction.
3. ``bypass``: mean score on positive validation prompts with the candidate ablated everywhere
   (lower is better).
4. in bypass order until ``top_k`` pass: ``induce`` (mean score on negative validation prompts
   with the direction added at its layer; must exceed the unedited score) and ``kl``
   (first-token KL on negative validation prompts under ablation; < ``kl_threshold``).
5. ``select``: the lowest bypass score that passes the filters (falling back to the lowest
   bypass with ``passed`` false when none does).

The score is the refusal score (:mod:`steer.directions.scores`) for prompt sets, and for pairs
the per-token log-probability margin of the positive reply over the negative one.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from steer.activations import forward

# one rule for ablating a direction: on the layers a per-layer one has vectors for, else all
from steer.artifacts import ablation
from steer.directions.methods import DirectionMethod, compute_direction
from steer.directions.scores import kl_divergence, next_token_logits
from steer.errors import InvalidArgumentError
from steer.interventions import Ablate, Add, Intervention
from steer.models import ModelHandle
from steer.vectors import SteeringVector

#: maps (interventions) -> per-example scores on a fixed validation set
Scorer = Callable[[Sequence[Intervention]], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Candidate:
    """One direction. ``layer`` is None for a per-layer candidate."""

    layer: int | None
    position: int
    vector: SteeringVector
    bypass: float = math.nan
    induce: float = math.nan
    kl: float = math.nan

    @property
    def label(self) -> str:
        where = "per-layer" if self.layer is None else f"layer {self.layer}"
        return f"{where} @ {self.position}"

    @property
    def hooks(self) -> tuple[str, ...]:
        layers = self.vector.layers if self.layer is None else (self.layer,)
        return tuple(f"blocks.{layer}.hook_resid_pre" for layer in layers)

    def ablation(self) -> Ablate:
        return ablation(self.vector)

    def addition(self, strength: float = 1.0) -> Add:
        return Add(self.vector, strength, hooks=self.hooks)


@dataclass
class SearchResult:
    candidates: list[Candidate]
    selected: Candidate
    passed: bool
    baseline_positive: float
    baseline_negative: float
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    notes: list[str] = field(default_factory=list)


def resid_hooks(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(num_layers)]


def collect(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    logits: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations (n, num_layers, positions, d_model) at every block input, and optionally
    the (n, vocab) next-token logits of the same pass."""
    hooks = resid_hooks(handle.num_layers)
    result = forward(
        handle,
        prompts,
        hooks=hooks,
        positions=tuple(positions),
        logits="last" if logits else "none",
        batch_size=batch_size,
        progress=progress,
    )
    stacked = torch.stack([result.activations[name] for name in hooks], dim=1)  # type: ignore[misc]
    return stacked, result.logits if logits else None  # type: ignore[return-value]


def candidate_layers(
    num_layers: int, layers: Sequence[int], low: float, high: float
) -> tuple[int, ...]:
    if layers:
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise InvalidArgumentError(
                f"layers {bad} out of range for a model with {num_layers} layers",
                field="search.layers",
            )
        return tuple(sorted(set(layers)))
    return tuple(
        layer for layer in range(num_layers) if low * num_layers <= layer < high * num_layers
    )


def token_covariances(
    handle: ModelHandle, prompts: Sequence[Sequence[int]], *, batch_size: int = 16
) -> torch.Tensor:
    """(num_layers, d_model, d_model) float64 covariance of every block input over all tokens
    of ``prompts`` but the first: the tokens an ablation acts on, less the attention sink,
    whose activation is tens of times larger than the rest and would swamp the estimate.
    Accumulated batch by batch, so memory does not grow with the number of prompts."""
    hooks = resid_hooks(handle.num_layers)
    size = handle.d_model
    total = torch.zeros(len(hooks), size, dtype=torch.float64)
    outer = torch.zeros(len(hooks), size, size, dtype=torch.float64)
    count = 0
    for start in range(0, len(prompts), batch_size):
        result = forward(
            handle,
            prompts[start : start + batch_size],
            hooks=hooks,
            positions="all",
            batch_size=batch_size,
        )
        for index, name in enumerate(hooks):
            rows = result.activations[name]
            assert isinstance(rows, list)
            tokens = torch.cat([row[1:] for row in rows]).double()
            total[index] += tokens.sum(0)
            outer[index] += tokens.T @ tokens
        count += sum(len(row) - 1 for row in result.activations[hooks[0]])
    if count < 2:
        raise InvalidArgumentError(
            "need at least two tokens after the first to estimate a covariance", field="data"
        )
    mean = total / count
    return (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)


def make_candidates(
    method: DirectionMethod,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    layers: Sequence[int],
    positions: Sequence[int],
    per_layer: bool,
    covariances: torch.Tensor | None = None,
    per_layer_layers: Sequence[int] | None = None,
) -> list[Candidate]:
    """Directions from activations (n, num_layers, len(positions), d_model) of both sets;
    ``covariances`` (num_layers, d_model, d_model) for methods that whiten. A per-layer
    candidate covers ``per_layer_layers`` (default: every layer), so layers a user chose
    bound it too."""
    candidates = []
    for index, position in enumerate(positions):
        directions = {}
        for layer in range(positive.shape[1]):
            try:
                directions[layer] = compute_direction(
                    method,
                    positive[:, layer, index],
                    negative[:, layer, index],
                    None if covariances is None else covariances[layer],
                )
            except InvalidArgumentError:
                # e.g. the embedding of a template token is the same for every prompt
                continue
        for layer in layers:
            if layer in directions:
                vector = SteeringVector.from_shared(directions[layer], name=f"L{layer}@{position}")
                candidates.append(Candidate(layer, position, vector))
        if per_layer_layers is not None:
            directions = {k: v for k, v in directions.items() if k in set(per_layer_layers)}
        if per_layer and directions:
            vector = SteeringVector(per_layer=directions, name=f"per-layer@{position}")
            candidates.append(Candidate(None, position, vector))
    if not candidates:
        raise InvalidArgumentError(
            "no candidate direction: the two sets have the same activations everywhere",
            field="data",
        )
    return candidates


def score_candidates(
    candidates: list[Candidate],
    *,
    positive_score: Scorer,
    negative_score: Scorer,
    negative_kl: Callable[[Sequence[Intervention]], float],
    top_k: int,
    passes: Callable[[Candidate], bool] = lambda candidate: True,
    max_checks: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    check: Callable[[], None] = lambda: None,
) -> list[Candidate]:
    """Bypass for every candidate; then, in bypass order, induce and KL until ``top_k``
    checked candidates ``passes`` the filters or ``max_checks`` (default ``4 * top_k``) were
    checked. (Checking only the best few by bypass finds none that passes when the strongest
    directions are also the most damaging ones, as on Qwen2.5-0.5B.)"""
    max_checks = max(top_k, max_checks if max_checks is not None else 4 * top_k)
    scored = []
    total = len(candidates) + 2 * min(max_checks, len(candidates))
    done = 0
    for candidate in candidates:
        check()
        bypass = float(positive_score([candidate.ablation()]).mean())
        scored.append(replace(candidate, bypass=bypass))
        done += 1
        if progress:
            progress(f"bypass {candidate.label}: {bypass:.3f}", done / total)
    order = sorted(range(len(scored)), key=lambda i: scored[i].bypass)
    passing = 0
    for i in order[:max_checks]:
        check()
        candidate = scored[i]
        induce = float(negative_score([candidate.addition()]).mean())
        done += 1
        kl = negative_kl([candidate.ablation()])
        done += 1
        scored[i] = replace(candidate, induce=induce, kl=kl)
        passing += passes(scored[i])
        if progress:
            progress(f"check {candidate.label}: induce {induce:.3f}, kl {kl:.4f}", done / total)
        if passing >= top_k:
            break
    return scored


def passes_filters(
    candidate: Candidate,
    *,
    kl_threshold: float,
    require_induce: bool,
    induce_floor: float = 0.0,
) -> bool:
    """The KL filter and (for single-layer candidates) the induce filter: adding the direction
    must lift the score on negative prompts above ``induce_floor`` (the search passes the
    unedited model's score there, so the direction must make the model more refusing)."""
    return candidate.kl < kl_threshold and (
        not require_induce or candidate.layer is None or candidate.induce > induce_floor
    )


def select(
    candidates: Sequence[Candidate],
    *,
    kl_threshold: float,
    require_induce: bool,
    induce_floor: float = 0.0,
) -> tuple[Candidate, bool]:
    """Lowest bypass among candidates passing the KL (and induce) filters."""
    checked = [c for c in candidates if not math.isnan(c.kl)]
    passing = [
        c
        for c in checked
        if passes_filters(
            c,
            kl_threshold=kl_threshold,
            require_induce=require_induce,
            induce_floor=induce_floor,
        )
    ]
    pool = passing or checked or list(candidates)
    best = min(pool, key=lambda c: c.bypass)
    return best, bool(passing)


def prompt_scorer(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    batch_size: int,
) -> Scorer:
    from steer.directions.scores import refusal_scores_from_logits

    def score(interventions: Sequence[Intervention]) -> torch.Tensor:
        logits = next_token_logits(handle, prompts, interventions, batch_size=batch_size)
        return refusal_scores_from_logits(logits, token_ids)

    return score


def kl_scorer(
    handle: ModelHandle, prompts: Sequence[Sequence[int]], batch_size: int
) -> Callable[[Sequence[Intervention]], float]:
    base = next_token_logits(handle, prompts, batch_size=batch_size)

    def kl(interventions: Sequence[Intervention]) -> float:
        edited = next_token_logits(handle, prompts, interventions, batch_size=batch_size)
        return float(kl_divergence(base, edited).mean())

    return kl


def write_table(path: Path, result: SearchResult) -> Path:
    """The full sweep as CSV: one row per candidate."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "position", "bypass", "induce", "kl", "selected"])
        for c in result.candidates:
            writer.writerow(
                [
                    "per-layer" if c.layer is None else c.layer,
                    c.position,
                    f"{c.bypass:.5f}",
                    "" if math.isnan(c.induce) else f"{c.induce:.5f}",
                    "" if math.isnan(c.kl) else f"{c.kl:.6f}",
                    int(c is result.selected),
                ]
            )
    return path


def write_plot(path: Path, result: SearchResult, *, title: str = "") -> Path:
    """Bypass score vs layer, one line per position; per-layer candidates as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a figure with its own Agg canvas: no global backend switch, no pyplot state
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for position in result.positions:
        points = [c for c in result.candidates if c.position == position and c.layer is not None]
        color = None
        if points:
            (line,) = axes.plot(
                [int(c.layer or 0) for c in points],
                [c.bypass for c in points],
                marker="o",
                markersize=3,
                label=f"position {position}",
            )
            color = line.get_color()
        for c in result.candidates:
            if c.position == position and c.layer is None:
                axes.axhline(
                    c.bypass,
                    color=color,
                    linestyle=":",
                    linewidth=1.5,
                    label=f"per-layer @ {position}",
                )
    axes.axhline(result.baseline_positive, color="black", linestyle="--", label="no ablation")
    selected = result.selected
    if selected.layer is not None:
        axes.plot([selected.layer], [selected.bypass], "k*", markersize=12, label="selected")
    axes.set_xlabel("layer")
    axes.set_ylabel("score on positive validation (ablated)")
    axes.set_title(title or "direction sweep")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
