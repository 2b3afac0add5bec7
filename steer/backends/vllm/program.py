"""steer's ops on vLLM's flattened batches (imports no vLLM; runs in vLLM's worker processes).

vLLM runs one forward pass over the tokens of every scheduled request laid end to end: a
(tokens, d_model) tensor mixing prompt chunks and decode tokens of many requests. A request's
interventions reach the worker once, as :class:`SteeringSpec` (its ops per hook point, lowered
in the service by the one :class:`~steer.hooks.HookResolver`) under a fingerprint key; each
request names its key in ``SamplingParams.extra_args``.

Per batch composition the worker stacks the rows' ops per hook point with the same
:class:`~steer.plan._PointProgram` the hf engine uses (ablation bases (rows, K, D), per-phase
additions (rows, D)); per pass :class:`FlatProgram.delta` gathers them per token with the pass's
token -> row map and each token's phase (position < prompt length: prompt). Rows without ops
at a point are not touched.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steer.hooks import HookPoint, HookResolver
from steer.interventions import AddVector, Intervention, Phase, ProjectOut
from steer.plan import _PointProgram

#: SamplingParams.extra_args key under which a request names its steering
EXTRA_ARGS_KEY = "steer"


@dataclass(frozen=True)
class SteeringSpec:
    """One request's interventions, lowered: (hook point, op) in application order."""

    ops: tuple[tuple[HookPoint, ProjectOut | AddVector], ...]

    @property
    def is_empty(self) -> bool:
        return not self.ops

    def key(self) -> str:
        """A fingerprint of the ops (their tensors' bytes included): the registration key and
        the request's prefix-cache salt, so equal steering shares cached prompt KV and different
        steering never does."""
        digest = hashlib.blake2b(digest_size=16)
        for point, op in self.ops:
            digest.update(point.name.encode())
            if isinstance(op, ProjectOut):
                digest.update(b"project%r" % op.weight)
                tensor = op.unit
            else:
                digest.update(b"add" + op.phase.value.encode())
                tensor = op.vector
            buffer = io.BytesIO()
            buffer.write(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
            digest.update(buffer.getvalue())
        return "steer-" + digest.hexdigest()


def lower_request(
    interventions: Sequence[Intervention], resolver: HookResolver, d_model: int
) -> SteeringSpec:
    """Lower ``interventions`` (already checked by :func:`steer.backends.check_request`) to the
    plain ops the worker applies, float32 on the CPU."""
    ops: list[tuple[HookPoint, ProjectOut | AddVector]] = []
    for intervention in interventions:
        if intervention.is_noop():
            continue
        for point, op in intervention.lowered(resolver, d_model):
            assert isinstance(op, (ProjectOut, AddVector)) and op.speaker is None
            if isinstance(op, ProjectOut):
                ops.append((point, ProjectOut(op.unit.float().cpu(), op.weight)))
            else:
                ops.append((point, AddVector(op.vector.float().cpu(), op.phase)))
    return SteeringSpec(tuple(ops))


class FlatProgram:
    """The ops of one batch composition at one hook point, for flattened tokens."""

    def __init__(self, program: _PointProgram, batch_size: int) -> None:
        self.basis = program.basis
        self.weights = program.weights
        self.prompt_add = program.additions[Phase.PROMPT]
        self.generated_add = program.additions[Phase.GENERATED]
        # batch row -> index among the rows with ops here (-1: none)
        lookup = torch.full((batch_size,), -1, dtype=torch.long)
        lookup[program.rows.cpu()] = torch.arange(len(program.rows))
        self.lookup = lookup.to(program.rows.device)

    def delta(
        self, x: torch.Tensor, token_rows: torch.Tensor, is_prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What to add to ``x`` (tokens, D): (token indices, (M, D) deltas), or None.

        ``token_rows``: batch row of each real token (padding tokens beyond it are skipped);
        ``is_prompt``: (tokens,) bool."""
        index = self.lookup[token_rows]
        tokens = torch.nonzero(index >= 0).squeeze(1)
        if tokens.numel() == 0:
            return None
        index = index[tokens]
        sub = x.index_select(0, tokens)
        delta = torch.zeros_like(sub)
        if self.prompt_add is not None or self.generated_add is not None:
            prompt = self._addition(self.prompt_add, index, sub)
            generated = self._addition(self.generated_add, index, sub)
            delta = torch.where(is_prompt[tokens][:, None], prompt, generated)
        if self.basis is not None:
            basis = self.basis.index_select(0, index)  # (M, K, D)
            coefficient = torch.bmm(sub[:, None, :], basis.transpose(1, 2))  # (M, 1, K)
            if self.weights is not None:
                coefficient = coefficient * self.weights.index_select(0, index)[:, None, :]
            delta = delta - torch.bmm(coefficient, basis).squeeze(1)
        return tokens, delta

    @staticmethod
    def _addition(
        table: torch.Tensor | None, index: torch.Tensor, sub: torch.Tensor
    ) -> torch.Tensor:
        if table is None:
            return torch.zeros_like(sub)
        return table.index_select(0, index)


def build_flat_programs(
    specs: Sequence[SteeringSpec | None], dtype: torch.dtype, device: torch.device
) -> dict[HookPoint, FlatProgram]:
    """Stack the ops of a batch's rows (``specs[i]``: row i's, None = unsteered) per point."""
    by_point: dict[HookPoint, dict[int, list[ProjectOut | AddVector]]] = {}
    for row, spec in enumerate(specs):
        if spec is None:
            continue
        for point, op in spec.ops:
            by_point.setdefault(point, {}).setdefault(row, []).append(op)
    programs: dict[HookPoint, FlatProgram] = {}
    for point, row_ops in by_point.items():
        ordered: Mapping[int, list] = {
            row: sorted(ops, key=lambda op: 0 if isinstance(op, ProjectOut) else 1)
            for row, ops in row_ops.items()
        }
        program = _PointProgram(len(specs), ordered, dtype, device)
        programs[point] = FlatProgram(program, len(specs))
    return programs
