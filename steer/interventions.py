"""Interventions: what to do to the residual stream, lowered to ops at hook points.

Value objects:

* :class:`Add` -- ``x <- x + strength * v_L`` at the given hook points, for prompt tokens,
  generated tokens, or both (:class:`Phase`).
* :class:`Ablate` -- directional ablation ``x <- x - w (x . r) r`` (``r`` unit) at every block
  input and every attention and MLP output, i.e. ``blocks.L.hook_resid_pre``,
  ``blocks.L.hook_attn_out`` and ``blocks.L.hook_mlp_out`` for every layer in scope. With
  ``w = 1`` this removes the direction from everything the model reads at those points.

Each intervention lowers to primitive *ops* at hook points (:class:`ProjectOut`,
:class:`AddVector`), once per model (:meth:`Intervention.lowered`); :mod:`steer.plan` stacks
the ops of every row of a batch into the batched tensors the hooks apply.

Gates (:mod:`steer.gates`) lower to two more ops: :class:`ReadGate` decides a gate at its
condition's hook point (read before any op there edits ``x``) and :class:`GatedOp` wraps an op so
that it acts only where its gate fired. Decisions are per-pass or per-request state
(:class:`steer.plan.GateState`), handed to the plan's hooks with the pass like the speakers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from steer.errors import InvalidArgumentError
from steer.hooks import HookKind, HookPoint, HookResolver, resid_post_hooks
from steer.limits import MAX_INTERVENTION_MAGNITUDE, finite
from steer.vectors import SteeringVector


class Phase(StrEnum):
    """Which tokens an intervention acts on."""

    PROMPT = "prompt"
    GENERATED = "generated"
    ALL = "all"

    def covers(self, phase: Phase) -> bool:
        return self is Phase.ALL or self is phase


#: hook kinds that together make ablation complete (everything written to the residual stream)
ABLATION_KINDS = (HookKind.RESID_PRE, HookKind.ATTN_OUT, HookKind.MLP_OUT)


def _check_finite(value: float, field_name: str) -> float:
    """A strength, weight or slider value: finite and within MAX_INTERVENTION_MAGNITUDE."""
    return finite(value, field_name, magnitude=MAX_INTERVENTION_MAGNITUDE)


# ---------------------------------------------------------------------------------------------
# Primitive ops


@dataclass(frozen=True, eq=False)
class ProjectOut:
    """``x <- x - weight * (x . unit) unit``."""

    unit: torch.Tensor
    weight: float = 1.0
    speaker: str | None = None


@dataclass(frozen=True, eq=False)
class AddVector:
    """``x <- x + vector`` on the tokens of ``phase``."""

    vector: torch.Tensor
    phase: Phase = Phase.ALL
    speaker: str | None = None


@dataclass(frozen=True, eq=False)
class RowFunction:
    """Extension op: ``x_row <- fn(x_row, mask)`` for one row.

    ``x_row`` is (tokens, d_model) in the model's dtype; ``mask`` is a (tokens,) bool tensor of
    the tokens the op covers (its phase and speaker); ``fn`` must leave the others unchanged.
    SAE feature sliders lower to this op.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    phase: Phase = Phase.ALL
    speaker: str | None = None


class GateScope(StrEnum):
    """Where a gate's decision holds (:mod:`steer.gates`)."""

    #: per token, from that token's activation at the condition's hook, in the same pass
    TOKEN = "token"
    #: once per row, from the prompt's last token, then held for the whole reply (CAST)
    PROMPT = "prompt"
    #: once per row, from the first reply tokens drawn without the edit; where it fires, the
    #: reply starts over with the edit on from its first token (:mod:`steer.gates`)
    REPLY = "reply"


@dataclass(frozen=True, eq=False)
class ReadGate:
    """Decide a gate at this hook point: per token, ``(x . unit) > threshold`` (``<`` if
    ``below``), read before any op at the point edits ``x``. ``gate`` is the key the gated ops
    find the decision under (the :class:`~steer.gates.Gated` intervention itself). A condition
    over several hooks lowers to one read per hook: all but the last (``final`` False) only add
    ``x . unit`` (``unit`` already times the hook's weight) to the pass's running sum for the
    gate; the last adds its own and decides on the sum. ``mean`` (reply scope): the read only
    adds its sum to the row's running total over the reply window (:class:`steer.plan.WindowSum`);
    the engine decides on the window's mean when it closes."""

    gate: object
    #: (d_model,) float32; None where ``score`` gives the value instead
    unit: torch.Tensor | None
    threshold: float
    below: bool
    scope: GateScope
    final: bool = True
    speaker: None = None
    mean: bool = False
    #: the value compared per token instead of ``x . unit``: (tokens, d_model) in the model's
    #: dtype -> (tokens,) float32 on the same device (an SAE feature's activation,
    #: :class:`steer.sae.conditions.FeatureCondition`)
    score: Callable[[torch.Tensor], torch.Tensor] | None = None

    def value(self, x_row: torch.Tensor) -> torch.Tensor:
        """(tokens, d_model) -> (tokens,) float32: what the gate compares with its threshold."""
        if self.score is not None:
            return self.score(x_row)
        assert self.unit is not None, "a read without a score projects onto its unit"
        return x_row.float() @ self.unit


@dataclass(frozen=True, eq=False)
class GatedOp:
    """``op`` on the tokens where ``gate`` fired. ``decided_before``: this op's hook point comes
    at or after the condition's in the forward pass, so a prompt gate is already decided there
    during the prompt pass (for an op before it, the engine runs the prompt pass again once the
    gate has fired: :attr:`steer.plan.InterventionPlan.needs_refill`)."""

    op: ProjectOut | AddVector | RowFunction
    gate: object
    scope: GateScope
    decided_before: bool

    @property
    def speaker(self) -> str | None:
        return self.op.speaker


Op = ProjectOut | AddVector | RowFunction | ReadGate | GatedOp


# ---------------------------------------------------------------------------------------------
# Interventions


class Intervention:
    """Base class: an intervention lowers itself to ops at hook points of a given model.

    Subclasses implement :meth:`lower`; callers use :meth:`lowered`, which lowers once per
    model and keeps the ops on the object. Lowering depends only on the intervention and the
    model, so a request's interventions are lowered once however often they are validated and
    planned (the service's conversion, :meth:`Engine.submit <steer.generation.Engine.submit>`,
    the plan of every batch the row is in).
    """

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        raise NotImplementedError

    def lowered(self, resolver: HookResolver, d_model: int) -> tuple[tuple[HookPoint, Op], ...]:
        """:meth:`lower` for this model, computed on the first call (raises as it does)."""
        cached = self.__dict__.get("_lowered")
        if cached is not None and cached[0] is resolver and cached[1] == d_model:
            return cached[2]  # type: ignore[no-any-return]
        ops = tuple(self.lower(resolver, d_model))
        # object.__setattr__: the frozen dataclass subclasses keep their fields immutable
        object.__setattr__(self, "_lowered", (resolver, d_model, ops))
        return ops

    def is_noop(self) -> bool:
        """True when the intervention changes nothing (zero strength or zero weight)."""
        return False


def _check_dimension(vector: SteeringVector, d_model: int, field_name: str) -> None:
    if vector.d_model != d_model:
        raise InvalidArgumentError(
            f"vector has {vector.d_model} dimensions but the model's d_model is {d_model}",
            field=field_name,
        )


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    """Activation addition: ``x <- x + strength * vector.at(L)`` at each hook in ``hooks``.

    With ``hooks`` empty, the vector is added at ``blocks.L.hook_resid_post`` for every layer it
    has its own vector for (the repeng / control-vector convention).
    """

    vector: SteeringVector
    strength: float = 1.0
    hooks: tuple[str, ...] = ()
    phase: Phase = Phase.ALL
    #: only the tokens this character speaks (see GenerationRequest.speakers); None = all tokens
    speaker: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", _check_finite(self.strength, "strength"))
        object.__setattr__(self, "hooks", tuple(self.hooks))
        try:
            object.__setattr__(self, "phase", Phase(self.phase))
        except ValueError:
            raise InvalidArgumentError(
                f"unknown phase {self.phase!r}; use prompt, generated or all", field="phase"
            ) from None

    def is_noop(self) -> bool:
        return self.strength == 0.0

    def hook_points(self, resolver: HookResolver) -> list[HookPoint]:
        if self.hooks:
            return [resolver.parse(name, field="hooks") for name in self.hooks]
        if not self.vector.per_layer:
            raise InvalidArgumentError(
                "a shared vector needs explicit hooks (e.g. blocks.10.hook_resid_post)",
                field="hooks",
            )
        return [resolver.parse(name) for name in resid_post_hooks(self.vector.layers)]

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        _check_dimension(self.vector, d_model, "vector")
        ops: list[tuple[HookPoint, Op]] = []
        for point in self.hook_points(resolver):
            layer = 0 if point.layer is None else point.layer
            vector = self.vector.at(layer) * self.strength
            if not bool(torch.isfinite(vector).all()):
                raise InvalidArgumentError(
                    f"strength {self.strength:g} times this vector overflows float32",
                    field="strength",
                )
            ops.append((point, AddVector(vector, self.phase, self.speaker)))
        return ops


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Directional ablation of ``direction`` (normalised per layer) on ``layers`` (all if None).

    ``weight`` scales the removed component (1 = full ablation); ``layer_weights`` overrides it
    per layer (a heretic-style kernel), layers missing from it get weight 0.
    """

    direction: SteeringVector
    layers: tuple[int, ...] | None = None
    weight: float = 1.0
    layer_weights: Mapping[int, float] | None = None
    kinds: tuple[HookKind, ...] = field(default=ABLATION_KINDS)
    speaker: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _check_finite(self.weight, "weight"))
        if self.layer_weights is not None:
            checked = {
                int(layer): _check_finite(value, f"layer_weights[{layer}]")
                for layer, value in self.layer_weights.items()
            }
            object.__setattr__(self, "layer_weights", checked)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    def is_noop(self) -> bool:
        if self.layer_weights is not None:
            return all(value == 0.0 for value in self.layer_weights.values())
        return self.weight == 0.0

    def weight_at(self, layer: int) -> float:
        if self.layer_weights is not None:
            return self.layer_weights.get(layer, 0.0)
        return self.weight

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        _check_dimension(self.direction, d_model, "direction")
        layers = self.layers if self.layers is not None else tuple(range(resolver.num_layers))
        for layer in layers:
            if not 0 <= layer < resolver.num_layers:
                raise InvalidArgumentError(
                    f"layer {layer} out of range: "
                    f"the model has layers 0..{resolver.num_layers - 1}",
                    field="layers",
                )
        unit = self.direction.normalized()
        ops: list[tuple[HookPoint, Op]] = []
        for layer in layers:
            weight = self.weight_at(layer)
            if weight == 0.0:
                continue
            for kind in self.kinds:
                op = ProjectOut(unit.at(layer), weight, self.speaker)
                ops.append((HookPoint(layer, kind), op))
        return ops


# ---------------------------------------------------------------------------------------------
# Validation


def validate(interventions: Sequence[Intervention], resolver: HookResolver, d_model: int) -> None:
    """Raise :class:`InvalidArgumentError` if any intervention does not fit the model."""
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise InvalidArgumentError(
                f"expected an Intervention, got {type(intervention).__name__}",
                field="interventions",
            )
        intervention.lowered(resolver, d_model)
