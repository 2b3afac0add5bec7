"""The per-batch plan: every row's ops grouped by hook point and stacked into batched tensors.

:func:`build_plan` groups the ops of every row of a batch by hook point and stacks them, once per
batch composition, so a hook costs one or two ``einsum``/``add`` calls whatever the number of
rows. Rows without ops at a point are left untouched (bit-identical), because the plan only
touches the rows that have ops there. A plan holds no per-pass state: the engine passes each
forward pass's phase, speakers and gate decisions to :meth:`InterventionPlan.hooks`.

Order at one hook point: gate reads first (on ``x`` as it arrives), then ablations, then
additions, in the order the interventions were given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from steer.hooks import HookPoint, HookResolver
from steer.interventions import (
    AddVector,
    GatedOp,
    GateScope,
    Intervention,
    Op,
    Phase,
    ProjectOut,
    ReadGate,
    RowFunction,
)


@dataclass(frozen=True)
class Window:
    """The key a reply-scope gate's reads use in a row's decision dict: True once the condition
    has fired at a position of the reply's first tokens (the engine then starts the reply over
    with the gate decided; the gate's own key holds only the engine's decisions)."""

    gate: object


@dataclass(frozen=True)
class WindowSum:
    """The key a mean reply gate's reads (:attr:`ReadGate.mean`) keep their running total under
    in a row's decision dict: the projections summed over the window's positions read so far
    (``below`` ones negated). The engine divides it by the positions read when the window closes
    (:meth:`steer.gates.Gated.window_fires`)."""

    gate: object


class GateState:
    """The gate decisions one forward pass sees.

    ``decisions``: per row of the pass, the prompt gates decided so far, a dict its request owns
    (the engine keeps one per row and passes them in the rows' current order, so a decision
    follows its request through every replan). ``token_masks``: the token gates of this pass
    only, (row, gate) -> (tokens,) bool; a new GateState per pass, so they never outlive it.
    ``held``: a second prompt pass over rows whose prompt gates are already decided (see
    :attr:`InterventionPlan.needs_refill`): no prompt gate is read again, and every gated op
    acts where its gate fired, before the condition's hook too.
    """

    def __init__(self, decisions: Sequence[dict[object, bool | float]], held: bool = False) -> None:
        self.decisions = decisions
        self.held = held
        self.token_masks: dict[tuple[int, object], torch.Tensor] = {}
        #: (row, gate) -> the projections summed so far in this pass, for a gate read at several
        #: hooks (:attr:`ReadGate.final`)
        self.partial: dict[tuple[int, object], torch.Tensor] = {}


class _PointProgram:
    """All ops of every row at one hook point, stacked for the batch.

    Unscoped ops are stacked into (rows, K, D) bases and (rows, D) sums and applied in one go.
    Speaker-scoped and gated ops are kept as a short list and applied with a per-token mask built
    from the pass's ``token_speakers`` and gate decisions; gate reads run first.
    """

    def __init__(
        self,
        batch_size: int,
        row_ops: Mapping[int, list[Op]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.scoped: list[tuple[int, Op]] = []
        self.reads: list[tuple[int, ReadGate]] = []
        unscoped: dict[int, list[ProjectOut | AddVector]] = {}
        for row, ops in row_ops.items():
            for op in ops:
                if isinstance(op, ReadGate):
                    # projected in float32 whatever the model's dtype: only the device moves
                    unit = None if op.unit is None else op.unit.to(device)
                    self.reads.append((row, replace(op, unit=unit)))
                elif isinstance(op, (ProjectOut, AddVector)) and op.speaker is None:
                    unscoped.setdefault(row, []).append(op)
                else:
                    self.scoped.append((row, _to(op, dtype, device)))
        rows = sorted(unscoped)
        self.full_batch = len(rows) == batch_size
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        # Ablation: a (rows, K, D) stack of unit vectors with (rows, K) weights; absent -> zeros,
        # which makes x - 0 * (x . 0) 0 an exact no-op for that slot. Several full-weight
        # directions of one row are orthonormalised first, so their whole span is removed.
        self.basis: torch.Tensor | None = None
        self.basis_transposed: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.additions: dict[Phase, torch.Tensor | None] = {
            Phase.PROMPT: None,
            Phase.GENERATED: None,
        }
        if not rows:
            return
        d_model = _op_size(unscoped[rows[0]][0])
        max_k = max(sum(isinstance(op, ProjectOut) for op in ops) for ops in unscoped.values())
        if max_k:
            basis = torch.zeros(len(rows), max_k, d_model)
            weights = torch.zeros(len(rows), max_k)
            for index, row in enumerate(rows):
                projections = [op for op in unscoped[row] if isinstance(op, ProjectOut)]
                units = _orthonormal_if_full([op.unit for op in projections], projections)
                for k, (unit, op) in enumerate(zip(units, projections, strict=True)):
                    basis[index, k] = unit
                    weights[index, k] = op.weight
            self.basis = basis.to(device=device, dtype=dtype)
            self.basis_transposed = self.basis.transpose(1, 2).contiguous()
            # unit weights (full ablation, the common case) skip a multiply per hook
            if not torch.all(weights == 1.0):
                self.weights = weights.to(device=device, dtype=dtype)
        for phase in (Phase.PROMPT, Phase.GENERATED):
            total = torch.zeros(len(rows), d_model)
            any_add = False
            for index, row in enumerate(rows):
                for op in unscoped[row]:
                    if isinstance(op, AddVector) and op.phase.covers(phase):
                        total[index] += op.vector
                        any_add = True
            self.additions[phase] = total.to(device=device, dtype=dtype) if any_add else None

    def apply(
        self,
        x: torch.Tensor,
        phase: Phase,
        token_speakers: Sequence[Sequence[str | None]] | None,
        gates: GateState,
    ) -> torch.Tensor:
        """x: (batch, tokens, d_model) -> same shape."""
        for row, read in self.reads:
            _read_gate(x, row, read, phase, gates)
        x = self._apply_unscoped(x, phase)
        for row, scoped in self.scoped:
            op = scoped.op if isinstance(scoped, GatedOp) else scoped
            assert not isinstance(op, (ReadGate, GatedOp))
            if isinstance(op, (AddVector, RowFunction)) and not op.phase.covers(phase):
                continue
            if op.speaker is None:
                mask = torch.ones(x.shape[1], dtype=torch.bool)
            else:
                speakers = token_speakers[row] if token_speakers is not None else ()
                listed = [s == op.speaker for s in speakers[-x.shape[1] :]]
                if not any(listed):
                    continue
                mask = torch.tensor(listed, dtype=torch.bool)
            mask = mask.to(x.device)
            if isinstance(scoped, GatedOp):
                mask = mask & _gate_mask(scoped, row, phase, gates, x.shape[1], x.device)
                if not bool(mask.any()):
                    continue
            weight = mask.to(device=x.device, dtype=x.dtype)[:, None]  # (T, 1)
            x = x.clone()
            if isinstance(op, RowFunction):
                x[row] = op.fn(x[row], weight[:, 0].bool())
            elif isinstance(op, ProjectOut):
                coefficient = (x[row] @ op.unit)[:, None] * op.weight
                x[row] = x[row] - weight * coefficient * op.unit
            else:
                x[row] = x[row] + weight * op.vector
        return x

    def _apply_unscoped(self, x: torch.Tensor, phase: Phase) -> torch.Tensor:
        addition = self.additions[phase]
        if self.basis is None and addition is None:
            return x
        subset = x if self.full_batch else x.index_select(0, self.rows)
        shifted = subset if addition is None else subset + addition[:, None, :]
        if self.basis is not None and self.basis_transposed is not None:
            # x - sum_k w_k (x . u_k) u_k as two batched matmuls (the hot path of every hook)
            coefficient = torch.bmm(subset, self.basis_transposed)  # (rows, T, K)
            if self.weights is not None:
                coefficient = coefficient * self.weights[:, None, :]
            shifted = torch.baddbmm(shifted, coefficient, self.basis, alpha=-1)
        if self.full_batch:
            return shifted
        return x.index_copy(0, self.rows, shifted)


def _read_gate(x: torch.Tensor, row: int, read: ReadGate, phase: Phase, gates: GateState) -> None:
    """Record where ``read``'s gate fires for ``row``: every token (token scope), or the prompt's
    last token during the prompt pass (prompt scope; left padding puts it at position -1). A read
    that is not its gate's last only adds its projection to the gate's sum for the pass."""
    if read.scope is GateScope.PROMPT:
        if phase is not Phase.PROMPT or gates.held:
            return  # decided in the (first) prompt pass, held since
        x = x[:, -1:, :]
    elif read.scope is GateScope.REPLY:
        if read.gate in gates.decisions[row]:
            return  # decided by the engine: its window has closed or the reply started over
        x = x[:, -1:, :]  # the position that draws the next reply token
    projection = read.value(x[row])  # (T,)
    summed = gates.partial.pop((row, read.gate), None)
    if summed is not None:
        projection = summed + projection
    if not read.final:
        gates.partial[(row, read.gate)] = projection
        return
    fired = projection < read.threshold if read.below else projection > read.threshold
    if read.scope is GateScope.PROMPT:
        gates.decisions[row][read.gate] = bool(fired[0])
    elif read.scope is GateScope.REPLY:
        # a prompt pass run again (prompt gates held) reads the prompt afresh: its read replaces
        # the first pass's; generated tokens add to what the window has read so far
        if read.mean:
            total = WindowSum(read.gate)
            value = -float(projection[0]) if read.below else float(projection[0])
            earlier = gates.decisions[row].get(total, 0.0) if phase is Phase.GENERATED else 0.0
            gates.decisions[row][total] = earlier + value
            return
        window = Window(read.gate)
        earlier = phase is Phase.GENERATED and gates.decisions[row].get(window, False)
        gates.decisions[row][window] = bool(earlier or fired[0])
    else:
        gates.token_masks[(row, read.gate)] = fired


def _gate_mask(
    op: GatedOp, row: int, phase: Phase, gates: GateState, tokens: int, device: torch.device
) -> torch.Tensor:
    """(tokens,) bool: where ``op``'s gate lets it act on ``row`` in this pass."""
    if op.scope is GateScope.TOKEN:
        return gates.token_masks[(row, op.gate)][-tokens:]
    if op.scope is GateScope.REPLY:
        fired = gates.decisions[row].get(op.gate, False)  # the engine's decision only
        return torch.full((tokens,), fired, dtype=torch.bool, device=device)
    decided = phase is Phase.GENERATED or op.decided_before or gates.held
    fired = decided and gates.decisions[row].get(op.gate, False)
    return torch.full((tokens,), fired, dtype=torch.bool, device=device)


def _to(op: Op, dtype: torch.dtype, device: torch.device) -> Op:
    if isinstance(op, GatedOp):
        inner = _to(op.op, dtype, device)
        assert isinstance(inner, (ProjectOut, AddVector, RowFunction))
        return GatedOp(inner, op.gate, op.scope, op.decided_before)
    if isinstance(op, (RowFunction, ReadGate)):
        return op
    if isinstance(op, ProjectOut):
        return ProjectOut(op.unit.to(device, dtype), op.weight, op.speaker)
    return AddVector(op.vector.to(device, dtype), op.phase, op.speaker)


def _op_size(op: ProjectOut | AddVector) -> int:
    return op.unit.numel() if isinstance(op, ProjectOut) else op.vector.numel()


def _orthonormal_if_full(units: list[torch.Tensor], ops: list[ProjectOut]) -> list[torch.Tensor]:
    """Several full-weight ablations at one point must remove their whole span: orthonormalise."""
    if len(units) < 2 or any(op.weight != 1.0 for op in ops):
        return units
    q, r = torch.linalg.qr(torch.stack(units, dim=1).double())
    keep = r.diagonal().abs() > 1e-6
    basis = [q[:, k].float() if keep[k] else torch.zeros_like(units[k]) for k in range(len(units))]
    return basis


class InterventionPlan:
    """Per-hook-point programs for one batch of rows.

    The plan holds no per-pass state: each forward pass gets its own hook functions from
    :meth:`hooks`, bound to that pass's phase and speakers.
    """

    def __init__(self, programs: dict[HookPoint, _PointProgram], batch_size: int = 0) -> None:
        self.programs = programs
        self.batch_size = batch_size

    @property
    def is_empty(self) -> bool:
        return not self.programs

    @property
    def needs_refill(self) -> bool:
        """Whether a prompt gate guards an op before its condition's hook. Such an op cannot act
        in the prompt pass that decides the gate (the decision comes later in that pass), so
        where the gate fires the prompt pass runs again with the decision held
        (``hooks(..., held=True)``): a request whose gate fired then runs exactly as with the
        gate's edit always on, prompt included, and one whose gate did not, as without it."""
        return any(
            isinstance(op, GatedOp) and op.scope is GateScope.PROMPT and not op.decided_before
            for program in self.programs.values()
            for _, op in program.scoped
        )

    def refills(self, gate_decisions: Sequence[dict[object, bool | float]]) -> bool:
        """Whether this prompt pass must run again: :attr:`needs_refill` and a gate fired."""
        return self.needs_refill and any(
            value
            for d in gate_decisions
            for key, value in d.items()
            if not isinstance(key, Window | WindowSum)
        )

    @property
    def needs_speakers(self) -> bool:
        """Whether any op is speaker-scoped (SAE sliders and gated ops without a speaker are
        in the scoped list too, but act without the pass's speakers)."""
        return any(
            (op.op if isinstance(op, GatedOp) else op).speaker is not None
            for program in self.programs.values()
            for _, op in program.scoped
        )

    def hooks(
        self,
        phase: Phase,
        token_speakers: Sequence[Sequence[str | None]] | None = None,
        gate_decisions: Sequence[dict[object, bool | float]] | None = None,
        held: bool = False,
    ) -> dict[HookPoint, Callable[[torch.Tensor], torch.Tensor]]:
        """One function per hook point for a forward pass over ``phase``'s tokens (prompt or
        generated). ``token_speakers``, needed by speaker-scoped interventions: per row, the
        speaker of each token fed in this pass (right-aligned; padding is None).
        ``gate_decisions``: per row, the dict its request keeps its prompt gates' decisions in
        (written in the prompt pass, read in the decode passes); None = fresh ones, for a
        single pass. ``held``: the prompt pass again, with the prompt gates as decided (see
        :attr:`needs_refill`)."""
        if gate_decisions is None:
            gate_decisions = [{} for _ in range(self.batch_size)]
        gates = GateState(gate_decisions, held)

        def bind(program: _PointProgram) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: program.apply(x, phase, token_speakers, gates)

        return {point: bind(program) for point, program in self.programs.items()}


def build_plan(
    rows: Sequence[Sequence[Intervention]],
    resolver: HookResolver,
    d_model: int,
    dtype: torch.dtype,
    device: torch.device,
) -> InterventionPlan:
    """Lower every row's interventions and stack them per hook point."""
    by_point: dict[HookPoint, dict[int, list[Op]]] = {}
    for row, interventions in enumerate(rows):
        for intervention in interventions:
            if intervention.is_noop():
                continue
            for point, op in intervention.lowered(resolver, d_model):
                by_point.setdefault(point, {}).setdefault(row, []).append(op)
    programs = {}
    for point in sorted(by_point, key=lambda p: (-1 if p.layer is None else p.layer, p.kind)):
        row_ops = {
            row: sorted(ops, key=lambda op: 0 if isinstance(op, ProjectOut) else 1)
            for row, ops in by_point[point].items()
        }
        programs[point] = _PointProgram(len(rows), row_ops, dtype, device)
    return InterventionPlan(programs, len(rows))
