"""Scoped ops inside vLLM's flattened passes: token gates, SAE sliders, speaker scopes.

Imports no vLLM; runs in vLLM's worker processes.

A token gate decides per token, from that token's residual at its condition's hooks, in the
same forward pass; its ops act on the tokens where it fired, at or after the deciding hook
(:class:`steer.gates.Gated`). A Clamp or Scale feature slider encodes the tokens it covers with
its SAE, edits one feature and adds the decoded difference (:mod:`steer.sae.sliders`). A
speaker-scoped op acts on its speaker's tokens; a fired prompt or reply gate's edit on every
token. The hf engine applies all of these after the ungated ops at their point, one after
another, each on the stream as the ops before it left it, and only on the tokens of the rows
that asked; so does :class:`ScopedPass`, for each registered steering (key) on the tokens of the
rows naming it. Gate decisions live in the pass and never outlive it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steer.backends.vllm.program import GateRead, SaeEdit, ScopedOp, TokenGate
from steer.hooks import HookPoint
from steer.interventions import AddVector, Phase, ProjectOut
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import feature_slider, row_function

#: a slider's edit on the tokens it covers: (n, D) stream values, all-True mask -> new values
RowEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Read:
    gate: int
    #: (tokens, D) stream values -> (tokens,) float32: the projection onto a unit, or an SAE
    #: feature's activation
    value: Callable[[torch.Tensor], torch.Tensor]
    final: bool
    threshold: float
    below: bool


def _value(read: GateRead, saes: Mapping[str, SparseAutoencoder], device: torch.device) -> Any:
    if read.unit is None:
        assert read.sae is not None
        sae, feature = saes[read.sae], read.feature
        return lambda x: sae.encode(x)[..., feature].to(x.device)
    unit = read.unit.to(device)
    return lambda x: x.float() @ unit


@dataclass(frozen=True)
class _Op:
    gate: int | None
    phase: Phase
    op: ProjectOut | AddVector | None  # in the model's dtype, on its device; None: ``edit``
    edit: RowEdit | None = None
    speaker: str | None = None


@dataclass(frozen=True)
class Group:
    """The tokens of one pass whose rows name one steering key with scoped ops: their indices
    in the pass, whether each is a prompt token, and, per speaker its ops are scoped to, which
    tokens are that speaker's."""

    key: str
    table: ScopedTable
    tokens: torch.Tensor
    is_prompt: torch.Tensor
    speakers: dict[str, torch.Tensor]


class ScopedTable:
    """One registered steering's token gates and scoped ops, by hook point: the reads there (in
    forward order per gate) and the scoped ops there (in the order given). ``saes``: the
    registered SAEs its sliders name."""

    def __init__(
        self,
        gates: Sequence[TokenGate],
        scoped: Sequence[ScopedOp],
        saes: Mapping[str, SparseAutoencoder],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.reads: dict[HookPoint, list[_Read]] = {}
        self.ops: dict[HookPoint, list[_Op]] = {}
        for number, gate in enumerate(gates):
            for index, read in enumerate(gate.reads):
                final = index == len(gate.reads) - 1
                value = _value(read, saes, device)
                entry = _Read(number, value, final, gate.threshold, gate.below)
                self.reads.setdefault(read.point, []).append(entry)
        for each in scoped:
            op = each.op
            if isinstance(op, SaeEdit):
                slider = feature_slider(op.mode, saes[op.sae], op.feature, op.value)
                moved = _Op(each.gate, op.phase, None, row_function(slider), each.speaker)
            elif isinstance(op, ProjectOut):
                unit = op.unit.to(device=device, dtype=dtype)
                moved = _Op(each.gate, Phase.ALL, ProjectOut(unit, op.weight), None, each.speaker)
            else:
                vector = op.vector.to(device=device, dtype=dtype)
                moved = _Op(each.gate, op.phase, AddVector(vector, op.phase), None, each.speaker)
            self.ops.setdefault(each.point, []).append(moved)

    @property
    def points(self) -> set[HookPoint]:
        return set(self.reads) | set(self.ops)

    @property
    def speakers(self) -> set[str]:
        """The speakers its ops are scoped to."""
        return {op.speaker for ops in self.ops.values() for op in ops if op.speaker is not None}


class ScopedPass:
    """The token gates and scoped ops of one forward pass, per :class:`Group`."""

    def __init__(self, groups: list[Group]):
        self.groups = groups
        #: the points where some gate reads: where a hook must give the stream's value
        self.read_points: set[HookPoint] = set().union(*(group.table.reads for group in groups))
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.fired: dict[tuple[str, int], torch.Tensor] = {}

    def read(self, point: HookPoint, stream: torch.Tensor) -> None:
        """Take the gate reads at ``point`` from ``stream`` (before any op there edits it)."""
        for group in self.groups:
            for read in group.table.reads.get(point, ()):
                value = read.value(stream.index_select(0, group.tokens))
                slot = (group.key, read.gate)
                earlier = self.sums.pop(slot, None)
                if earlier is not None:
                    value = earlier + value
                if not read.final:
                    self.sums[slot] = value
                    continue
                self.fired[slot] = value < read.threshold if read.below else value > read.threshold

    def apply(
        self, point: HookPoint, target: torch.Tensor, stream: Callable[[], torch.Tensor]
    ) -> None:
        """Add the scoped ops' deltas at ``point`` to ``target`` in place, one op after another;
        ``stream()`` gives the stream's value as the ops so far left it. As the hf plan does, an
        op's delta is computed for every token of its group and weighted by the mask of the
        tokens it acts on (no wait on the device to pick them out)."""
        for group in self.groups:
            tokens = group.tokens
            for entry in group.table.ops.get(point, ()):
                mask = self._mask(group, entry)
                op = entry.op
                if isinstance(op, AddVector):
                    delta = op.vector.expand(tokens.shape[0], -1)
                else:
                    x = stream().index_select(0, tokens)
                    if op is None:  # a slider edits the covered tokens only
                        assert entry.edit is not None
                        covered = torch.ones_like(group.is_prompt) if mask is None else mask
                        delta, mask = entry.edit(x, covered) - x, None
                    else:
                        coefficient = (x @ op.unit)[:, None] * op.weight
                        delta = -(coefficient * op.unit)
                if mask is not None:
                    delta = delta * mask[:, None].to(delta.dtype)
                target.index_add_(0, tokens, delta.to(target.dtype))

    def _mask(self, group: Group, entry: _Op) -> torch.Tensor | None:
        """The tokens of ``group`` that ``entry`` acts on (None: all of them): where its gate
        fired, of its phase, of its speaker."""
        mask = None if entry.gate is None else self.fired[(group.key, entry.gate)]
        if entry.phase is not Phase.ALL:
            phase = group.is_prompt if entry.phase is Phase.PROMPT else ~group.is_prompt
            mask = phase if mask is None else mask & phase
        if entry.speaker is not None:
            spoken = group.speakers[entry.speaker]
            mask = spoken if mask is None else mask & spoken
        return mask
