"""Gated (conditional) interventions: Add, Ablate or an SAE slider only where a condition holds.

A :class:`Condition` reads one hook point and compares the projection of the residual onto a unit
direction with a threshold: it fires where ``x . unit > threshold`` (``<`` with ``below``). A
:class:`steer.sae.conditions.FeatureCondition` compares an SAE feature's activation instead.
:class:`Gated` wraps an intervention with a condition and a :class:`GateScope`:

* ``token`` -- decided per token from that token's activation at the condition's hook in the same
  forward pass; the wrapped ops act on the tokens where it fired. They must sit at the condition's
  hook point or after it in the forward pass (an op before it would need the decision first).
* ``prompt`` -- conditional activation steering (CAST, arXiv 2409.05907): decided once per row
  from the prompt's last token (the post-instruction position of a chat prompt), then held for
  every generated token. Where a wrapped op sits before the condition's hook, the prompt pass
  cannot apply it (the decision comes later in that pass), so for a row whose gate fired the
  engine runs the prompt pass again with the decision held: a request whose gate fired runs
  exactly as with the wrapped intervention always on (its prompt included), one whose gate did
  not as without it. The second pass costs one more prefill, only for rows whose gate fired and
  only when such an op exists.
* ``reply`` -- decided once per row from the model's first ``reply_tokens`` reply tokens, drawn
  without the wrapped edit: the condition is read at each position that draws one of them (the
  prompt's last token, then each reply token but the last) and fires if it fires at any (or,
  with ``reply_aggregate`` "mean", if the projections' mean over the window does: one
  position's spike then counts for less, a whole opening that leans one way for more). Where
  it does not, the reply goes on as drawn, bit-identical to one without the gate; where it does,
  the tokens drawn so far are dropped and the reply starts over from the prompt with the edit
  on, exactly as with the wrapped intervention always on (same seed, prompt pass included).
  So the gate can read what the model starts to say (a refusal's opening, a lecture's first
  words), which a prompt's last token does not show, and act before any of it is sent: the
  engine holds a row's first ``reply_tokens`` tokens back until its gates have decided. A fired
  row costs one more prompt pass and ``reply_tokens`` more decode steps.

The condition is read before any op at its hook point edits the residual. A gate that never fires
changes nothing: its ops touch no token. Gates lower to the engine's ops
(:class:`~steer.interventions.ReadGate`, :class:`~steer.interventions.GatedOp`); a decision lives
in the forward pass (token scope) or with its request (prompt scope), never on the plan or the
model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steer.errors import InvalidArgumentError, SteerError, within
from steer.hooks import HookPoint, HookResolver
from steer.interventions import (
    Ablate,
    Add,
    AddVector,
    GatedOp,
    GateScope,
    Intervention,
    Op,
    ProjectOut,
    ReadGate,
    RowFunction,
)
from steer.limits import MAX_INTERVENTION_MAGNITUDE, finite
from steer.plan import WindowSum
from steer.runtime import forward_order
from steer.vectors import SteeringVector

__all__ = [
    "DEFAULT_REPLY_TOKENS",
    "MAX_REPLY_TOKENS",
    "REPLY_AGGREGATES",
    "BaseCondition",
    "Condition",
    "GateScope",
    "Gated",
    "check_reply_aggregate",
    "check_reply_tokens",
    "reply_gated",
]

#: how many reply tokens a reply-scope gate reads when not told
DEFAULT_REPLY_TOKENS = 4
#: the most it may read (the engine holds that many tokens back before streaming)
MAX_REPLY_TOKENS = 64
#: how a reply-scope gate combines its window's positions: fires if any position's projection
#: passes the threshold (the default), or if their mean does
REPLY_AGGREGATES = ("any", "mean")


class BaseCondition:
    """What a gate reads and when it fires: a :class:`Condition` (a direction's projection) or
    a :class:`steer.sae.conditions.FeatureCondition` (an SAE feature's activation). Either
    lowers to :class:`~steer.interventions.ReadGate` ops; the gate fires where the value is
    above ``threshold`` (below it with ``below``)."""

    threshold: float
    below: bool

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hook names read, in the order given."""
        raise NotImplementedError

    def reads(
        self,
        gate: object,
        scope: GateScope,
        resolver: HookResolver,
        d_model: int,
        *,
        mean: bool = False,
    ) -> list[tuple[HookPoint, ReadGate]]:
        """The ops that decide ``gate``, in forward order, the last deciding; ``mean``: a reply
        gate deciding on its window's mean (:attr:`ReadGate.mean`)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Condition(BaseCondition):
    """Fires where the residual at ``hook`` projects onto ``direction`` (normalised; a
    :class:`SteeringVector` gives its vector at the hook's layer) above ``threshold``, or below it
    with ``below``.

    ``hook`` may name several hooks (a tuple, at distinct points; errors name them
    ``condition.hooks[i]``, as recipes and the wire do): the condition then reads each
    and compares the sum of the projections, each times its entry of ``weights`` (1 each by
    default), with the threshold -- a linear read of several layers at once, decided at the last
    of them in the forward pass (:func:`steer.calibration.summed_scores` calibrates one)."""

    hook: str | tuple[str, ...]
    direction: SteeringVector | torch.Tensor
    threshold: float
    below: bool = False
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", finite(self.threshold, "condition.threshold"))
        if not isinstance(self.direction, SteeringVector | torch.Tensor):
            raise InvalidArgumentError(
                f"expected a SteeringVector or a tensor, got {type(self.direction).__name__}",
                field="condition.direction",
            )
        hooks = _hooks(self.hook)
        if not isinstance(self.hook, str):
            object.__setattr__(self, "hook", hooks)
        weights = self.weights
        if isinstance(weights, str | bytes) or not isinstance(weights, tuple | list):
            raise InvalidArgumentError(
                f"expected a list of numbers, got {type(weights).__name__}",
                field="condition.weights",
            )
        if weights and isinstance(self.hook, str):
            raise InvalidArgumentError(
                "weights need hooks (a tuple of hook names)", field="condition.weights"
            )
        if weights and len(weights) != len(hooks):
            raise InvalidArgumentError(
                f"expected one weight per hook ({len(hooks)}), got {len(weights)}",
                field="condition.weights",
            )
        checked = tuple(
            finite(w, f"condition.weights[{i}]", magnitude=MAX_INTERVENTION_MAGNITUDE)
            for i, w in enumerate(weights)
        )
        object.__setattr__(self, "weights", checked)

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hook names read, in the order given."""
        return _hooks(self.hook)

    def reads(
        self,
        gate: object,
        scope: GateScope,
        resolver: HookResolver,
        d_model: int,
        *,
        mean: bool = False,
    ) -> list[tuple[HookPoint, ReadGate]]:
        """The ops that decide ``gate``, in forward order: one per hook, the last deciding
        (raises for an unknown hook, a repeated point or a bad direction); ``mean``: a reply
        gate deciding on its window's mean (:attr:`ReadGate.mean`)."""
        points = self.points(resolver)
        order = sorted(range(len(points)), key=lambda i: forward_order(points[i]))
        weights = self.weights or (1.0,) * len(points)
        reads = []
        for rank, index in enumerate(order):
            unit = self.unit(points[index], d_model) * weights[index]
            final = rank == len(order) - 1
            read = ReadGate(gate, unit, self.threshold, self.below, scope, final=final, mean=mean)
            reads.append((points[index], read))
        return reads

    def points(self, resolver: HookResolver) -> list[HookPoint]:
        """The hook points read, in the order given."""
        hooks = self.hooks
        single = len(hooks) == 1 and isinstance(self.hook, str)
        points = []
        for index, hook in enumerate(hooks):
            field = "condition.hook" if single else f"condition.hooks[{index}]"
            point = resolver.parse(hook, field=field)
            if point in points:
                raise InvalidArgumentError(f"reads {point.name} twice", field=field)
            points.append(point)
        return points

    def unit(self, point: HookPoint, d_model: int) -> torch.Tensor:
        """(d_model,) float32 unit vector of the direction at ``point``."""
        if isinstance(self.direction, SteeringVector):
            try:
                vector = self.direction.at(0 if point.layer is None else point.layer)
            except SteerError as error:
                raise InvalidArgumentError(error.message, field="condition.direction") from None
        else:
            vector = self.direction
        vector = vector.detach().to("cpu", torch.float32)
        if vector.dim() != 1 or vector.numel() != d_model:
            raise InvalidArgumentError(
                f"direction has shape {tuple(vector.shape)} but the model's d_model is {d_model}",
                field="condition.direction",
            )
        norm = float(vector.double().norm())  # float64: a float32 norm of large values overflows
        if not bool(torch.isfinite(vector).all()) or not norm > 0.0:
            raise InvalidArgumentError(
                "direction must be finite and nonzero", field="condition.direction"
            )
        return (vector.double() / norm).float()


@dataclass(frozen=True, eq=False)
class Gated(Intervention):
    """``inner`` (an Add, Ablate, SAE slider...) only where ``condition`` fires, per ``scope``.
    ``reply_tokens``: how many reply tokens a reply-scope gate reads (None:
    :data:`DEFAULT_REPLY_TOKENS`; other scopes take none); ``reply_aggregate``: how it combines
    them, one of :data:`REPLY_AGGREGATES` (None: "any"; other scopes take none)."""

    condition: BaseCondition
    inner: Intervention
    scope: GateScope = GateScope.TOKEN
    reply_tokens: int | None = None
    reply_aggregate: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scope", GateScope(self.scope))
        except ValueError:
            raise InvalidArgumentError(
                f"unknown scope {self.scope!r}; use token, prompt or reply", field="scope"
            ) from None
        object.__setattr__(self, "reply_tokens", _reply_tokens(self.reply_tokens, self.scope))
        aggregate = _reply_aggregate(self.reply_aggregate, self.scope)
        object.__setattr__(self, "reply_aggregate", aggregate)
        if not isinstance(self.condition, BaseCondition):
            raise InvalidArgumentError(
                "expected a Condition or a FeatureCondition", field="condition"
            )
        if not isinstance(self.inner, Intervention) or isinstance(self.inner, Gated):
            raise InvalidArgumentError(
                "expected an ungated intervention (Add, Ablate, an SAE slider)", field="inner"
            )

    def is_noop(self) -> bool:
        return self.inner.is_noop()

    def window_fires(self, decisions: Mapping[object, bool | float], count: int) -> bool:
        """Whether a mean reply gate fires on the window it has read: its ``count`` positions'
        running total in ``decisions`` (a row's decision dict), over ``count``, passes the
        threshold. False for an "any" gate, which its reads decide on their own."""
        if self.reply_aggregate != "mean" or count < 1:
            return False
        mean = float(decisions.get(WindowSum(self), 0.0)) / count
        if self.condition.below:
            return -mean < self.condition.threshold
        return mean > self.condition.threshold

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        mean = self.reply_aggregate == "mean"
        reads = self.condition.reads(self, self.scope, resolver, d_model, mean=mean)
        condition_point = reads[-1][0]
        try:
            inner_ops = self.inner.lowered(resolver, d_model)
        except SteerError as error:
            if error.status_code != "INVALID_ARGUMENT":
                raise
            raise within(error, "inner") from None
        ops: list[tuple[HookPoint, Op]] = list(reads)
        for point, op in inner_ops:
            ops.append((point, self._gated(op, point, condition_point)))
        return ops

    def _gated(self, op: Op, point: HookPoint, condition_point: HookPoint) -> GatedOp:
        if not isinstance(op, ProjectOut | AddVector | RowFunction):
            raise InvalidArgumentError(
                f"cannot gate an op of type {type(op).__name__}", field="inner"
            )
        after = forward_order(point) >= forward_order(condition_point)
        if self.scope is GateScope.REPLY:
            after = True  # decided in an earlier run of the reply, never in the pass it acts in
        if not after and self.scope is GateScope.TOKEN:
            raise InvalidArgumentError(
                f"{point.name} comes before the condition's hook {condition_point.name}: "
                "a token gate acts at or after its condition's hook",
                field=_inner_points_field(self.inner),
            )
        return GatedOp(op, self, self.scope, decided_before=after)


def reply_gated(interventions: Sequence[Intervention]) -> tuple[Gated, ...]:
    """The reply-scope gates among ``interventions`` (none that do nothing)."""
    return tuple(
        i
        for i in interventions
        if isinstance(i, Gated) and i.scope is GateScope.REPLY and not i.is_noop()
    )


def _reply_tokens(value: object, scope: GateScope) -> int | None:
    """``value`` checked for ``scope``: reply scope's window (None = the default), else None."""
    if scope is not GateScope.REPLY:
        if value is not None:
            raise InvalidArgumentError(
                f"only a reply-scope gate reads reply tokens (this one's scope is {scope.value})",
                field="reply_tokens",
            )
        return None
    return DEFAULT_REPLY_TOKENS if value is None else check_reply_tokens(value)


def _reply_aggregate(value: object, scope: GateScope) -> str | None:
    """``value`` checked for ``scope``: reply scope's aggregate (None = "any"), else None."""
    if scope is not GateScope.REPLY:
        if value is not None:
            raise InvalidArgumentError(
                f"only a reply-scope gate combines reply tokens (this one's scope is "
                f"{scope.value})",
                field="reply_aggregate",
            )
        return None
    return "any" if value is None else check_reply_aggregate(value)


def check_reply_aggregate(value: object) -> str:
    """``value`` if it is one of :data:`REPLY_AGGREGATES`, else ``INVALID_ARGUMENT`` at
    ``reply_aggregate``."""
    if not isinstance(value, str) or value not in REPLY_AGGREGATES:
        raise InvalidArgumentError(
            f"unknown aggregate {value!r}; use {' or '.join(REPLY_AGGREGATES)}",
            field="reply_aggregate",
        )
    return value


def check_reply_tokens(value: object) -> int:
    """``value`` if it is a reply-scope gate's window (a whole number from 1 to
    :data:`MAX_REPLY_TOKENS`), else ``INVALID_ARGUMENT`` at ``reply_tokens``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"expected a whole number, got {value!r}", field="reply_tokens")
    if not 1 <= value <= MAX_REPLY_TOKENS:
        raise InvalidArgumentError(
            f"must be from 1 to {MAX_REPLY_TOKENS}, got {value}", field="reply_tokens"
        )
    return value


def _hooks(hook: object) -> tuple[str, ...]:
    """``hook`` (one name or a non-empty sequence of names) as a tuple of names."""
    if isinstance(hook, str):
        return (hook,)
    if not isinstance(hook, tuple | list) or not hook:
        raise InvalidArgumentError(
            "expected a hook name or a non-empty list of them", field="condition.hook"
        )
    for index, name in enumerate(hook):
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"expected a hook name, got {type(name).__name__}",
                field=f"condition.hooks[{index}]",
            )
    return tuple(hook)


def _inner_points_field(inner: Intervention) -> str:
    """The field of ``inner`` that chooses its hook points."""
    if isinstance(inner, Add):
        return "inner.hooks"
    if isinstance(inner, Ablate):
        return "inner.layers"
    return "inner"
