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
* ``whitened``: the mean difference whitened by the negative set's covariance, ``S^-1 (mu+ - mu-)``
  with ``S`` shrunk towards a multiple of the identity (Fisher's linear discriminant with the
  negatives' covariance). Among directions that separate the two means by the same amount it
  has the least spread over the negatives, so ablating it moves harmless activations least.
  The search passes ``S`` as the covariance of the harmless prompts' activations at *every*
  token (the tokens an ablation acts on; see ``token_covariances``); called alone it uses the
  rows of ``negative``, shrunk by the Ledoit-Wolf estimate. Scaled like ``pca``: to the mean
  difference's length along it.

A new method is one class with ``name``, ``paired``, ``uses_covariance`` and ``__call__`` added
to ``METHODS``.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from steer.errors import InvalidArgumentError

#: default shrinkage of a covariance towards ``(trace / d) I`` (``search.shrinkage`` in recipes)
DEFAULT_SHRINKAGE = 0.05


def ledoit_wolf_shrinkage(rows: torch.Tensor) -> float:
    """Ledoit and Wolf's (2004) estimate of the shrinkage towards ``(trace / d) I`` that
    minimises the expected squared error of the covariance of ``rows`` (n, d): near 1 when
    n is small against d or the rows have no structure, near 0 when they have plenty."""
    centred = rows.double() - rows.double().mean(0)
    n, size = centred.shape
    sample = centred.T @ centred / n
    target = sample.diagonal().sum() / size
    # squared distances in the Frobenius norm divided by d
    dispersion = float(((sample - target * torch.eye(size, dtype=sample.dtype)) ** 2).sum()) / size
    if dispersion <= 0:
        return 1.0
    squared_norms = (centred**2).sum(1)
    # (1/n^2) sum_k |x_k x_k^T - S|^2 = (1/n^2) (sum_k |x_k|^4) - |S|^2 / n
    spread = (float((squared_norms**2).sum()) / n**2 - float((sample**2).sum()) / n) / size
    return min(max(spread, 0.0), dispersion) / dispersion


class DirectionMethod(Protocol):
    name: ClassVar[str]
    #: True if rows of positive and negative must correspond one to one
    paired: ClassVar[bool]
    #: True if the method whitens by a covariance of the negatives (passed as ``covariance``)
    uses_covariance: ClassVar[bool]

    def __call__(
        self,
        positive: torch.Tensor,
        negative: torch.Tensor,
        covariance: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def shrink(covariance: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - a) S + a (trace(S) / d) I`` for ``S`` (d, d) or a stack (..., d, d): invertible for
    any ``a`` in (0, 1], however few the samples behind ``S``."""
    if not 0.0 <= shrinkage <= 1.0:
        raise InvalidArgumentError(f"must be in [0, 1], got {shrinkage}", field="shrinkage")
    size = covariance.shape[-1]
    # (..., 1, 1): one scale per matrix of a stack (one per layer)
    scale = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / size
    identity = torch.eye(size, dtype=covariance.dtype, device=covariance.device)
    return (1.0 - shrinkage) * covariance + shrinkage * scale * identity


class MeanDifference:
    name: ClassVar[str] = "mean_difference"
    paired: ClassVar[bool] = False
    uses_covariance: ClassVar[bool] = False

    def __call__(
        self,
        positive: torch.Tensor,
        negative: torch.Tensor,
        covariance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return positive.mean(0) - negative.mean(0)


class PairedPCA:
    name: ClassVar[str] = "pca"
    paired: ClassVar[bool] = True
    uses_covariance: ClassVar[bool] = False

    def __call__(
        self,
        positive: torch.Tensor,
        negative: torch.Tensor,
        covariance: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
    uses_covariance: ClassVar[bool] = False

    def __call__(
        self,
        positive: torch.Tensor,
        negative: torch.Tensor,
        covariance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        difference = positive.mean(0) - negative.mean(0)
        baseline = negative.mean(0)
        unit = baseline / baseline.norm().clamp_min(1e-12)
        return difference - (difference @ unit) * unit


class Whitened:
    name: ClassVar[str] = "whitened"
    paired: ClassVar[bool] = False
    uses_covariance: ClassVar[bool] = True

    def __call__(
        self,
        positive: torch.Tensor,
        negative: torch.Tensor,
        covariance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        difference = (positive.mean(0) - negative.mean(0)).double()
        if covariance is None:
            if len(negative) < 2:
                raise InvalidArgumentError(
                    "the whitened method needs at least two negative examples", field="data"
                )
            rows = negative.double()
            covariance = shrink(torch.cov(rows.T), ledoit_wolf_shrinkage(rows))
        if covariance.shape != (len(difference), len(difference)):
            raise InvalidArgumentError(
                f"covariance must be ({len(difference)}, {len(difference)}), "
                f"got {tuple(covariance.shape)}",
                field="covariance",
            )
        direction = torch.linalg.solve(covariance.double(), difference)
        unit = direction / direction.norm().clamp_min(1e-300)
        # as long as the mean difference is along it, so additive strengths stay comparable
        return (unit * (difference @ unit)).float()


METHODS: dict[str, DirectionMethod] = {
    method.name: method for method in (MeanDifference(), PairedPCA(), Projected(), Whitened())
}


def get_method(name: str) -> DirectionMethod:
    if name not in METHODS:
        raise InvalidArgumentError(
            f"unknown direction method {name!r}; known: {', '.join(METHODS)}", field="method"
        )
    return METHODS[name]


def compute_direction(
    method: DirectionMethod | str,
    positive: torch.Tensor,
    negative: torch.Tensor,
    covariance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check shapes, run ``method`` and check the result is a usable direction.
    ``covariance`` (d_model, d_model) is passed to methods that whiten (``uses_covariance``)."""
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
    direction = method(
        positive.float(), negative.float(), covariance if method.uses_covariance else None
    )
    if not torch.isfinite(direction).all() or not direction.norm() > 0:
        raise InvalidArgumentError(
            f"method {method.name!r} produced a zero or non-finite direction (are the two sets "
            "identical?)",
            field="data",
        )
    return direction.float()
