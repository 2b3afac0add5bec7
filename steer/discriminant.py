"""Fisher's linear discriminant for a gate's condition, its shrinkage cross-validated.

:func:`discriminant_direction` whitens a mean difference by the pooled within-class covariance
of two sets of residuals, shrunk towards a scaled identity by the amount (one of
:data:`SHRINKAGES`) whose directions, fitted on all but one of :data:`FOLDS` folds, order the
held-out fold best. :meth:`steer.calibration.PromptReads.condition` uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.errors import InvalidArgumentError

__all__ = ["FOLDS", "SHRINKAGES", "auc", "discriminant_direction"]

#: the shrinkages a discriminant condition chooses among, by cross-validation on train
SHRINKAGES = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
#: folds of that cross-validation
FOLDS = 4


def discriminant_direction(
    fire: torch.Tensor, quiet: torch.Tensor, difference: torch.Tensor
) -> torch.Tensor:
    """``difference`` (float64) whitened by the pooled within-class covariance, shrunk towards
    a scaled identity by the shrinkage of :data:`SHRINKAGES` whose directions, fitted on three
    train folds, order the fourth fold's prompts best (mean AUC; ties to the larger shrinkage,
    the nearer the plain difference). Scaled so that its component along the mean difference
    is the mean difference's. A sample covariance of a few hundred prompts in a residual of
    ~1000 dimensions is far from the truth: whitened by it, the train prompts separate
    perfectly and new ones do not."""
    if min(len(fire), len(quiet)) < FOLDS:
        raise InvalidArgumentError(
            f"a discriminant condition needs at least {FOLDS} train prompts on each side",
            field="train",
        )
    totals = [0.0] * len(SHRINKAGES)
    for fold in range(FOLDS):
        held = [rows[fold::FOLDS] for rows in (fire, quiet)]
        kept = [_without_fold(rows, fold) for rows in (fire, quiet)]
        for index, vector in enumerate(_whitened(kept[0], kept[1], SHRINKAGES)):
            totals[index] += auc(held[0] @ vector, held[1] @ vector)
    best = max(range(len(SHRINKAGES)), key=lambda i: (round(totals[i], 9), SHRINKAGES[i]))
    [whitened] = _whitened(fire, quiet, (SHRINKAGES[best],))
    unit = whitened / whitened.norm().clamp_min(1e-300)
    return unit * (difference @ unit)


def _whitened(
    fire: torch.Tensor, quiet: torch.Tensor, shrinkages: Sequence[float]
) -> list[torch.Tensor]:
    """For each shrinkage ``a``, ``((1 - a) S + a (trace S / d) I)^-1 (mean fire - mean quiet)``
    with ``S`` the pooled within-class covariance (one eigendecomposition for all)."""
    difference = fire.mean(0) - quiet.mean(0)
    centred = torch.cat([fire - fire.mean(0), quiet - quiet.mean(0)])
    covariance = centred.T @ centred / max(len(centred) - 2, 1)
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp_min(0.0)
    scale = values.mean()
    rotated = vectors.T @ difference
    return [
        vectors @ (rotated / ((1.0 - a) * values + a * scale).clamp_min(1e-300)) for a in shrinkages
    ]


def _without_fold(rows: torch.Tensor, fold: int) -> torch.Tensor:
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[fold::FOLDS] = False
    return rows[keep]


def auc(fire: torch.Tensor, quiet: torch.Tensor) -> float:
    """The share of (fire, quiet) pairs ordered right, ties counting half."""
    above = (fire[:, None] > quiet[None, :]).double().mean()
    tied = (fire[:, None] == quiet[None, :]).double().mean()
    return float(above + 0.5 * tied)
