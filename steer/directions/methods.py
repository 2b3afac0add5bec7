"""Direction methods: a registry of functions from two activation sets to one direction.

A method sees activations only. ``positive`` and ``negative`` are ``(n, d_model)`` float32
tensors (for refusal: harmful and harmless prompts; for pairs: the two replies of each pair, row
``i`` of one paired with row ``i`` of the other). A method returns an un-normalised direction
``(d_model,)`` pointing from negative towards positive.

* ``mean_difference``: ``mean(positive) - mean(negative)`` (Arditi et al.; steering-vectors).
* ``pca``: first principal component of the paired differences ``positive_i - negative_i``
  (repeng), uncentred; its sign is fixed so that projecting the positives scores higher than
  the negatives, and it is scaled to the mean-difference's length along it so strengths stay
  comparable.
* ``projected``: the mean difference with its component along the negative (harmless) mean
  removed, ``r' = r - (r . g^) g^``.

A new method is one class with ``name``, ``paired`` and ``__call__`` added to ``METHODS``.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from steer.errors import InvalidArgumentError


class DirectionMethod(Protocol):
    name: ClassVar[str]
    #: True if rows of positive and negative must correspond one to one
    paired: ClassVar[bool]

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor: ...


class MeanDifference:
    name: ClassVar[str] = "mean_difference"
    paired: ClassVar[bool] = False

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return positive.mean(0) - negative.mean(0)


class PairedPCA:
    name: ClassVar[str] = "pca"
    paired: ClassVar[bool] = True

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        differences = (positive - negative).double()  # (n, D)
        # Uncentred: a shift shared by every pair is exactly what we are after, and centring
        # would remove it and leave only the noise around it.
        _, _, right = torch.linalg.svd(differences, full_matrices=False)
        component = right[0]
        unit = component / component.norm().clamp_min(1e-12)
        # sign: positives must project above negatives
        gap = float(((positive.double() - negative.double()) @ unit).mean())
        if gap < 0:
            unit, gap = -unit, -gap
        return (unit * gap).float()


class Projected:
    name: ClassVar[str] = "projected"
    paired: ClassVar[bool] = False

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        difference = positive.mean(0) - negative.mean(0)
        baseline = negative.mean(0)
        unit = baseline / baseline.norm().clamp_min(1e-12)
        return difference - (difference @ unit) * unit


METHODS: dict[str, DirectionMethod] = {
    method.name: method for method in (MeanDifference(), PairedPCA(), Projected())
}


def get_method(name: str) -> DirectionMethod:
    if name not in METHODS:
        raise InvalidArgumentError(
            f"unknown direction method {name!r}; known: {', '.join(METHODS)}", field="method"
        )
    return METHODS[name]


def compute_direction(
    method: DirectionMethod | str, positive: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """Check shapes, run ``method`` and check the result is a usable direction."""
    method = get_method(method) if isinstance(method, str) else method
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1]:
        raise InvalidArgumentError(
            f"activations must be (n, d_model) with equal d_model, got {tuple(positive.shape)} "
            f"and {tuple(negative.shape)}",
            field="activations",
        )
    if len(positive) == 0 or len(negative) == 0:
        raise InvalidArgumentError("need at least one example on each side", field="data")
    if method.paired and positive.shape != negative.shape:
        raise InvalidArgumentError(
            f"method {method.name!r} needs paired data; got {len(positive)} positive and "
            f"{len(negative)} negative examples",
            field="method",
        )
    direction = method(positive.float(), negative.float())
    if not torch.isfinite(direction).all() or not direction.norm() > 0:
        raise InvalidArgumentError(
            f"method {method.name!r} produced a zero or non-finite direction (are the two sets "
            "identical?)",
            field="data",
        )
    return direction.float()
