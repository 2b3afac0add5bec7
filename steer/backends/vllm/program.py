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
from dataclasses import dataclass, replace
from typing import Any

import torch

from steer.gates import Gated, GateScope
from steer.hooks import HookPoint, HookResolver
from steer.interventions import (
    AddVector,
    GatedOp,
    Intervention,
    Phase,
    ProjectOut,
    ReadGate,
    RowFunction,
)
from steer.plan import _PointProgram
from steer.sae.conditions import FeatureCondition
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import FeatureSlider

#: SamplingParams.extra_args key under which a request names its steering
EXTRA_ARGS_KEY = "steer"
#: SamplingParams.extra_args key under which a gate probe carries the id its reads are kept by
PROBE_ARGS_KEY = "steer_probe"
#: SamplingParams.extra_args key under which a request with speaker-scoped ops carries its
#: tokens' speakers (:func:`speakers_args`)
SPEAKERS_ARGS_KEY = "steer_speakers"


@dataclass(frozen=True)
class GateRead:
    """One prompt gate's read at one hook point, in a gate probe
    (:mod:`steer.backends.vllm.gates`): the residual at the prompt's last token, dotted with
    ``unit`` (float32 on the CPU, the hook's weight folded in), before any op at the point."""

    point: HookPoint
    #: the gate's index among its request's prompt gates (token gates: among its token gates)
    gate: int
    #: None for a read of SAE feature ``feature`` of the registered SAE ``sae`` (its activation
    #: is the value, :class:`steer.sae.conditions.FeatureCondition`)
    unit: torch.Tensor | None
    sae: str | None = None
    feature: int = 0
    #: how many positions it reads from the prompt's last token on (a reply gate's window;
    #: position k draws reply token k + 1)
    window: int = 1


def gate_read(
    point: HookPoint, number: int, read: ReadGate, condition: object, window: int = 1
) -> GateRead:
    """``read`` (one of ``condition``'s lowered reads) as the worker takes it."""
    if read.unit is not None:
        return GateRead(point, number, read.unit.float().cpu(), window=window)
    assert isinstance(condition, FeatureCondition)  # the only condition without a unit
    return GateRead(point, number, None, sae_key(condition.sae), condition.feature, window)


PlainOp = ProjectOut | AddVector


@dataclass(frozen=True)
class TokenGate:
    """A token-scope gate, lowered: per token, the sum of its ``reads`` against ``threshold``
    (``<`` with ``below``), decided at the last read in forward order. The ops it gates are
    :class:`ScopedOp` entries naming it (each at or after the deciding read,
    :class:`steer.gates.Gated`)."""

    reads: tuple[GateRead, ...]
    threshold: float
    below: bool


@dataclass(frozen=True)
class SaeEdit:
    """A feature slider that reads the stream (Clamp, Scale; AddDecoder is a plain addition):
    ``sae`` is the key of an SAE registered in the workers (:func:`sae_key`), ``mode`` a
    :class:`~steer.sae.modes.SliderMode` value; the worker builds the slider's edit there."""

    sae: str
    mode: str
    feature: int
    value: float
    phase: Phase


@dataclass(frozen=True)
class ScopedOp:
    """An op applied on some of a request's tokens after the ungated ops at its point, in the
    order given, each on the stream as the ops before it left it (the hf plan's scoped ops):
    a plain op or an SAE slider behind token gate ``gate`` (its index among the request's token
    gates), or on every token of its phase (``gate`` None), and of its ``speaker`` where it
    has one."""

    point: HookPoint
    op: PlainOp | SaeEdit
    gate: int | None
    #: the op acts only on this speaker's tokens (:attr:`GenerationRequest.speakers`)
    speaker: str | None = None


@dataclass(frozen=True)
class SteeringSpec:
    """One request's interventions, lowered: ungated plain ops (hook point, op) in application
    order; its token gates and scoped ops; ``reads``: the prompt-gate reads of a gate probe
    (none for a request that generates)."""

    ops: tuple[tuple[HookPoint, PlainOp], ...]
    reads: tuple[GateRead, ...] = ()
    token_gates: tuple[TokenGate, ...] = ()
    scoped: tuple[ScopedOp, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.ops and not self.reads and not self.scoped

    @property
    def needs_speakers(self) -> bool:
        """Whether an op is speaker-scoped: the request's token speakers go with it."""
        return any(entry.speaker is not None for entry in self.scoped)

    @property
    def saes(self) -> frozenset[str]:
        """The keys of the SAEs its sliders and feature gates need registered in the workers."""
        reads = [*self.reads, *(read for gate in self.token_gates for read in gate.reads)]
        return frozenset(
            [entry.op.sae for entry in self.scoped if isinstance(entry.op, SaeEdit)]
            + [read.sae for read in reads if read.sae is not None]
        )

    def key(self) -> str:
        """A fingerprint of the ops, token gates, scoped ops and reads (their tensors' bytes
        included): the registration key the request names."""
        digest = hashlib.blake2b(digest_size=16)
        _digest_ops(digest, self.ops)
        for gate in self.token_gates:
            digest.update(b"token-gate%r%r" % (gate.threshold, gate.below))
            _digest_reads(digest, gate.reads)
        for entry in self.scoped:
            digest.update(b"scoped%r%r" % (entry.gate, entry.speaker))
            if isinstance(entry.op, SaeEdit):
                digest.update(entry.point.name.encode() + repr(entry.op).encode())
            else:
                _digest_ops(digest, [(entry.point, entry.op)])
        _digest_reads(digest, self.reads)
        return ("steer-probe-" if self.reads else "steer-") + digest.hexdigest()

    def salt(self) -> str | None:
        """The request's prefix-cache salt: the fingerprint of what edits activations (all but
        the reads), so equal steering shares cached prompt KV and different steering never does
        (reads change no activation: a probe's prompt KV is that of the rest); None without
        edits."""
        edits = SteeringSpec(self.ops, token_gates=self.token_gates, scoped=self.scoped)
        return None if edits.is_empty else edits.key()


def _digest_ops(digest: Any, ops: Sequence[tuple[HookPoint, PlainOp]]) -> None:
    for point, op in ops:
        digest.update(point.name.encode())
        if isinstance(op, ProjectOut):
            digest.update(b"project%r" % op.weight)
            tensor = op.unit
        else:
            digest.update(b"add" + op.phase.value.encode())
            tensor = op.vector
        digest.update(_tensor_bytes(tensor))


def _digest_reads(digest: Any, reads: Sequence[GateRead]) -> None:
    for read in reads:
        digest.update(b"read%d/%d" % (read.gate, read.window) + read.point.name.encode())
        if read.unit is None:
            digest.update(b"feature%r%d" % (read.sae, read.feature))
        else:
            digest.update(_tensor_bytes(read.unit))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    buffer.write(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return buffer.getvalue()


def speakers_args(prompt: Sequence[str | None] | None, generated: str | None) -> dict[str, Any]:
    """A request's token speakers as its ``extra_args`` carry them: each prompt token's speaker
    (None: nobody's; no list: nobody's at all) and the generated tokens' speaker."""
    return {"prompt": list(prompt) if prompt is not None else None, "generated": generated}


def speakers_salt(args: dict[str, Any]) -> str:
    """What the prefix-cache salt adds for a request whose ops are speaker-scoped: its prompt
    KV depends on which token is whose, which the steering's key does not say."""
    return hashlib.blake2b(repr(args["prompt"]).encode(), digest_size=8).hexdigest()


def sae_key(sae: SparseAutoencoder) -> str:
    """The key an SAE is registered in the workers under: the loaded object's identity (the
    engine holds the object while it is registered, so the key is never reused meanwhile)."""
    return f"sae-{id(sae):x}"


def saes_of(interventions: Sequence[Intervention]) -> dict[str, SparseAutoencoder]:
    """The SAEs ``interventions``' sliders read (gated ones included), by :func:`sae_key`."""
    found = {}
    for intervention in interventions:
        inner = intervention.inner if isinstance(intervention, Gated) else intervention
        if isinstance(inner, FeatureSlider):
            found[sae_key(inner.sae)] = inner.sae
        if isinstance(intervention, Gated) and isinstance(intervention.condition, FeatureCondition):
            found[sae_key(intervention.condition.sae)] = intervention.condition.sae
    return found


def lower_request(
    interventions: Sequence[Intervention], resolver: HookResolver, d_model: int
) -> SteeringSpec:
    """Lower ``interventions`` (already checked by :func:`steer.backends.check_request`) to what
    the worker applies: plain ops, float32 on the CPU, token gates and scoped ops. A prompt or
    reply gate among them is one that fired (the engine leaves the others out,
    :mod:`steer.backends.vllm.gates`, :mod:`steer.backends.vllm.replies`): its edit is on for
    every token, as scoped ops after the ungated ones, where the hf engine applies a gated op,
    so two projections of one direction give what they give there."""
    ops: list[tuple[HookPoint, PlainOp]] = []
    gates: list[TokenGate] = []
    scoped: list[ScopedOp] = []
    for intervention in interventions:
        if intervention.is_noop():
            continue
        inner = intervention.inner if isinstance(intervention, Gated) else intervention
        fired = isinstance(intervention, Gated) and intervention.scope is not GateScope.TOKEN
        gate = None
        lowered = (inner if fired else intervention).lowered(resolver, d_model)
        for point, op in lowered:
            if isinstance(op, ReadGate):  # a token gate's (check_request refused the others)
                assert isinstance(intervention, Gated)
                condition = intervention.condition
                if gate is None:
                    gate = len(gates)
                    gates.append(TokenGate((), condition.threshold, condition.below))
                read = gate_read(point, gate, op, condition)
                gates[gate] = replace(gates[gate], reads=(*gates[gate].reads, read))
                continue
            plain = op.op if isinstance(op, GatedOp) else op
            speaker = plain.speaker
            if isinstance(plain, RowFunction):
                assert isinstance(inner, FeatureSlider)
                edit = SaeEdit(
                    sae_key(inner.sae), inner.mode.value, inner.feature, inner.value, inner.phase
                )
                scoped.append(ScopedOp(point, edit, gate, speaker))
            elif isinstance(op, GatedOp) or speaker is not None or fired:
                scoped.append(ScopedOp(point, _plain(plain), gate, speaker))
            else:
                ops.append((point, _plain(plain)))
    return SteeringSpec(tuple(ops), token_gates=tuple(gates), scoped=tuple(scoped))


def _plain(op: object) -> PlainOp:
    """``op`` float32 on the CPU, its speaker dropped (a :class:`ScopedOp` holds it)."""
    assert isinstance(op, (ProjectOut, AddVector))
    if isinstance(op, ProjectOut):
        return ProjectOut(op.unit.float().cpu(), op.weight)
    return AddVector(op.vector.float().cpu(), op.phase)


class Selection:
    """The tokens of one pass that belong to a given set of steered rows.

    ``tokens`` None: every real token of the pass (``x[:count]``), else their indices; ``index``:
    each selected token's position among the rows with ops; ``is_prompt``: each selected
    token's phase, None when they are all of one phase (``phase`` says which)."""

    def __init__(
        self, lookup: torch.Tensor, token_rows: torch.Tensor, is_prompt: torch.Tensor
    ) -> None:
        index = lookup[token_rows]
        steered = index >= 0
        self.count = int(token_rows.numel())
        if bool(steered.all()):
            self.tokens: torch.Tensor | None = None
        else:
            self.tokens = torch.nonzero(steered).squeeze(1)
            index, is_prompt = index[self.tokens], is_prompt[self.tokens]
        self.index = index
        self.empty = self.tokens is not None and self.tokens.numel() == 0
        prompt_tokens = int(is_prompt.sum())
        self.phase: Phase | None = None
        self.is_prompt: torch.Tensor | None = is_prompt
        if prompt_tokens == 0 or prompt_tokens == is_prompt.numel():
            self.phase = Phase.GENERATED if prompt_tokens == 0 else Phase.PROMPT
            self.is_prompt = None


class FlatProgram:
    """The ops of one batch composition at one hook point, for flattened tokens.

    ``uniform``: every row with ops here has the same ops (one steering for the whole batch, or
    one row), so they apply as plain matrix products without gathering per-token copies."""

    def __init__(self, program: _PointProgram, batch_size: int, uniform: bool) -> None:
        self.uniform = uniform
        self.basis = program.basis
        self.weights = program.weights
        self.additions = {
            phase: program.additions[phase] for phase in (Phase.PROMPT, Phase.GENERATED)
        }
        # batch row -> index among the rows with ops here (-1: none)
        lookup = torch.full((batch_size,), -1, dtype=torch.long)
        lookup[program.rows.cpu()] = torch.arange(len(program.rows))
        self.lookup = lookup.to(program.rows.device)
        #: whether the delta reads the stream (ablation); an addition alone does not
        self.needs_stream = self.basis is not None
        #: rows with ops here: the programs of one pass that share them share a Selection
        self.rows_key = tuple(program.rows.tolist())
        if uniform and self.basis is not None:
            self.basis = self.basis[0]  # (K, D)
            self.basis_transposed = self.basis.t().contiguous()
            self.weights = None if self.weights is None else self.weights[0]
        if uniform:
            self.additions = {
                phase: None if table is None else table[0]
                for phase, table in self.additions.items()
            }

    def apply(self, target: torch.Tensor, stream: torch.Tensor, selection: Selection) -> None:
        """Add this point's delta, computed from the residual-stream value ``stream``, to
        ``target`` in place (the same tensor, or the part of the stream a module returns)."""
        if selection.empty:
            return
        if self.uniform and selection.tokens is None:
            self._apply_in_place(target[: selection.count], stream[: selection.count], selection)
            return
        tokens = selection.tokens
        sub = stream[: selection.count] if tokens is None else stream.index_select(0, tokens)
        delta = self._delta(sub, selection)
        if delta is None:
            return
        if tokens is None:
            target[: selection.count] += delta.to(target.dtype)
        else:
            target.index_add_(0, tokens, delta.to(target.dtype))

    def _apply_in_place(
        self, target: torch.Tensor, sub: torch.Tensor, selection: Selection
    ) -> None:
        """The hot path (every row steered alike, e.g. one request): two or three fused ops."""
        coefficient = None
        if self.basis is not None:
            coefficient = sub @ self.basis_transposed  # (M, K), read before anything is added
            if self.weights is not None:
                coefficient = coefficient * self.weights
        prompt, generated = self.additions[Phase.PROMPT], self.additions[Phase.GENERATED]
        if selection.phase is not None:
            vector = prompt if selection.phase is Phase.PROMPT else generated
            if vector is not None:
                target += vector
        elif prompt is not None or generated is not None:
            assert selection.is_prompt is not None
            zero = torch.zeros((), dtype=target.dtype, device=target.device)
            target += torch.where(
                selection.is_prompt[:, None],
                zero if prompt is None else prompt,
                zero if generated is None else generated,
            )
        if coefficient is not None and self.basis is not None:
            target.addmm_(coefficient, self.basis, alpha=-1)

    def _delta(self, sub: torch.Tensor, selection: Selection) -> torch.Tensor | None:
        """The delta of the selected tokens ``sub`` (M, D), gathered per token's row."""
        delta = self._added(sub, selection)
        if self.basis is None:
            return delta
        if self.uniform:
            coefficient = sub @ self.basis_transposed  # (M, K)
            if self.weights is not None:
                coefficient = coefficient * self.weights
            projection = coefficient @ self.basis
        else:
            basis = self.basis.index_select(0, selection.index)  # (M, K, D)
            coefficient = torch.bmm(sub[:, None, :], basis.transpose(1, 2))  # (M, 1, K)
            if self.weights is not None:
                coefficient = (
                    coefficient * self.weights.index_select(0, selection.index)[:, None, :]
                )
            projection = torch.bmm(coefficient, basis).squeeze(1)
        return -projection if delta is None else delta - projection

    def _added(self, sub: torch.Tensor, selection: Selection) -> torch.Tensor | None:
        prompt, generated = self.additions[Phase.PROMPT], self.additions[Phase.GENERATED]
        if prompt is None and generated is None:
            return None
        chosen = (
            self._addition(prompt, selection.index, sub),
            self._addition(generated, selection.index, sub),
        )
        if selection.phase is not None:
            return chosen[0] if selection.phase is Phase.PROMPT else chosen[1]
        assert selection.is_prompt is not None
        return torch.where(selection.is_prompt[:, None], *chosen)

    def _addition(
        self, table: torch.Tensor | None, index: torch.Tensor, sub: torch.Tensor
    ) -> torch.Tensor:
        if table is None:
            return torch.zeros_like(sub)
        if self.uniform:
            return table.expand_as(sub)
        return table.index_select(0, index)


def build_flat_programs(
    specs: Sequence[SteeringSpec | None],
    keys: Sequence[str | None],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[HookPoint, FlatProgram]:
    """Stack the ops of a batch's rows (``specs[i]``: row i's under ``keys[i]``, None =
    unsteered) per point."""
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
        uniform = len({keys[row] for row in row_ops}) == 1
        programs[point] = FlatProgram(program, len(specs), uniform)
    return programs
