"""Steering vectors and directions: small immutable values with arithmetic.

A :class:`SteeringVector` holds one d_model vector per layer, or one vector shared by every layer.
Arithmetic returns new objects (``honest - 0.3 * verbose``); tensors are float32 on the CPU and are
cast to the model's dtype/device once, when an intervention plan is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from steer.errors import InvalidArgumentError
from steer.limits import finite


def _as_vector(value: torch.Tensor | list[float], *, field_name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise InvalidArgumentError(
            f"a steering vector must be 1-D and non-empty, got shape {tuple(tensor.shape)}",
            field=field_name,
        )
    if not torch.isfinite(tensor).all():
        raise InvalidArgumentError("vector contains NaN or inf", field=field_name)
    return tensor.contiguous()


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Per-layer vectors ``{layer: Tensor[d_model]}`` and/or a ``shared`` one for other layers."""

    per_layer: Mapping[int, torch.Tensor] = field(default_factory=dict)
    shared: torch.Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        cleaned = {
            int(layer): _as_vector(vec, field_name=f"vector.layers[{layer}]")
            for layer, vec in dict(self.per_layer).items()
        }
        object.__setattr__(self, "per_layer", MappingProxyType(cleaned))
        if self.shared is not None:
            object.__setattr__(self, "shared", _as_vector(self.shared, field_name="vector.shared"))
        if not cleaned and self.shared is None:
            raise InvalidArgumentError(
                "a steering vector needs at least one vector", field="vector"
            )
        sizes = {v.numel() for v in cleaned.values()}
        if self.shared is not None:
            sizes.add(self.shared.numel())
        if len(sizes) != 1:
            raise InvalidArgumentError(
                f"vectors of different sizes: {sorted(sizes)}", field="vector"
            )

    @classmethod
    def from_shared(cls, vector: torch.Tensor | list[float], name: str = "") -> SteeringVector:
        return cls(shared=torch.as_tensor(vector, dtype=torch.float32), name=name)

    @property
    def d_model(self) -> int:
        if self.shared is not None:
            return self.shared.numel()
        return next(iter(self.per_layer.values())).numel()

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers with their own vector (empty for a purely shared vector)."""
        return tuple(sorted(self.per_layer))

    def has_layer(self, layer: int) -> bool:
        return self.shared is not None or layer in self.per_layer

    def at(self, layer: int) -> torch.Tensor:
        """The vector used at ``layer``: its own, else the shared one."""
        if layer in self.per_layer:
            return self.per_layer[layer]
        if self.shared is not None:
            return self.shared
        raise InvalidArgumentError(
            f"vector {self.name or '(unnamed)'} has no vector for layer {layer}; it covers "
            f"layers {list(self.layers)}",
            field="vector",
        )

    def _map(self, fn) -> SteeringVector:  # type: ignore[no-untyped-def]
        return SteeringVector(
            per_layer={layer: fn(vec) for layer, vec in self.per_layer.items()},
            shared=None if self.shared is None else fn(self.shared),
            name=self.name,
        )

    def normalized(self) -> SteeringVector:
        """Unit-norm copy (each layer's vector separately). A zero vector is an error."""

        def unit(vec: torch.Tensor) -> torch.Tensor:
            norm = vec.norm()
            if not norm > 0:
                raise InvalidArgumentError("cannot normalise a zero vector", field="vector")
            return vec / norm

        return self._map(unit)

    def __mul__(self, scale: float) -> SteeringVector:
        factor = finite(scale, "strength")
        return self._map(lambda vec: vec * factor)

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if other.d_model != self.d_model:
            raise InvalidArgumentError(
                f"cannot add vectors of size {self.d_model} and {other.d_model}", field="vector"
            )
        layers = set(self.per_layer) | set(other.per_layer)
        per_layer = {}
        for layer in layers:
            if self.has_layer(layer) and other.has_layer(layer):
                per_layer[layer] = self.at(layer) + other.at(layer)
            else:
                per_layer[layer] = self.at(layer) if self.has_layer(layer) else other.at(layer)
        shared = None
        if self.shared is not None and other.shared is not None:
            shared = self.shared + other.shared
        elif self.shared is not None or other.shared is not None:
            shared = self.shared if self.shared is not None else other.shared
        return SteeringVector(per_layer=per_layer, shared=shared, name=self.name or other.name)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def __repr__(self) -> str:
        kind = f"layers={list(self.layers)}" if self.per_layer else "shared"
        return f"SteeringVector({self.name!r}, d_model={self.d_model}, {kind})"
