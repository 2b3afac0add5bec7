"""The part of the vLLM backend that lives in vLLM's worker processes.

:func:`install`, :func:`register` and :func:`forget` are sent to every worker with
``collective_rpc`` (module-level functions taking the worker first). :func:`install` puts one
forward pre-hook on the model that reads, once per pass, which request each token belongs to
(``runner.req_indices``), each row's steering key (``SamplingParams.extra_args``) and each token's
phase (its position against its request's prompt length); hooks at the hook points that
registered steering uses then add their :class:`~steer.backends.vllm.program.FlatProgram` delta.
A gate probe's reads (:class:`~steer.backends.vllm.program.GateRead`) are taken at their points
before any delta, at the prompt's last token, and kept under the id in the probe's
``extra_args`` (vLLM adds a suffix of its own to request ids) until :func:`take_reads`.

Where each hook point lives in a vLLM Llama-style decoder layer, which returns ``(hidden,
residual)`` with the residual stream being their sum (vLLM fuses the residual add into the next
norm)::

    hook_embed       output of embed_tokens
    hook_resid_pre   layer input: stream = hidden (+ residual); the delta goes into hidden
    hook_attn_out    output of self_attn
    hook_mlp_out     output of mlp
    hook_resid_post  layer output: stream = hidden + residual; the delta goes into hidden

Deltas are added in place, into tensors the forward pass has just made for the next module.

The hooks are plain PyTorch hooks, so the model must run eagerly (``enforce_eager=True``; CUDA
graphs would replay kernels without them).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steer.backends.vllm.program import (
    EXTRA_ARGS_KEY,
    PROBE_ARGS_KEY,
    SPEAKERS_ARGS_KEY,
    FlatProgram,
    GateRead,
    Selection,
    SteeringSpec,
    build_flat_programs,
)
from steer.backends.vllm.scoped import Group, ScopedPass, ScopedTable
from steer.hooks import HookKind, HookPoint
from steer.sae.loading import SparseAutoencoder

#: batch compositions whose stacked programs are kept
PROGRAM_CACHE_SIZE = 64
#: gate probes whose reads are kept until taken (a probe aborted before its reads were taken
#: leaves them behind; the oldest go first)
READS_KEPT = 4096


@dataclass(frozen=True)
class _Reads:
    """The gate reads of one pass at one hook point: the tokens read, the unit each is dotted
    with (or the SAE feature whose activation it takes), and where each value goes (read id,
    gate, offset from the prompt's last token)."""

    tokens: torch.Tensor
    reads: list[GateRead]
    labels: list[tuple[str, int, int]]


class _Pass:
    """What the hooks of one forward pass need: the batch's programs and, per set of steered
    rows, which tokens they own (worked out once per pass, shared by every point)."""

    def __init__(
        self,
        programs: dict[HookPoint, FlatProgram],
        rows: torch.Tensor,
        is_prompt: torch.Tensor,
        reads: dict[HookPoint, _Reads],
        scoped: ScopedPass | None,
    ) -> None:
        self.programs = programs
        self.reads = reads
        self.scoped = scoped
        self.rows = rows
        self.is_prompt = is_prompt
        self._selections: dict[tuple[int, ...], Selection] = {}

    def selection(self, program: FlatProgram) -> Selection:
        found = self._selections.get(program.rows_key)
        if found is None:
            found = Selection(program.lookup, self.rows, self.is_prompt)
            self._selections[program.rows_key] = found
        return found


class WorkerSteering:
    """One worker's registered steering and the hooks that apply it."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.model: nn.Module = runner.get_model()
        inner = self.model.model
        self.layers: nn.ModuleList = inner.layers
        self.embed: nn.Module = inner.embed_tokens
        self.specs: dict[str, SteeringSpec] = {}
        #: the token gates and scoped ops of the registered steering that has them, by key
        self.scoped_tables: dict[str, ScopedTable] = {}
        #: SAEs the registered sliders read, by key (:func:`register_sae`)
        self.saes: dict[str, SparseAutoencoder] = {}
        self.hooked: set[HookPoint] = set()
        self.current: _Pass | None = None
        #: gate reads' values: read id -> (gate, hook name, offset) -> value
        self.values: OrderedDict[str, dict[tuple[int, str, int], float]] = OrderedDict()
        self._programs: OrderedDict[tuple[str | None, ...], dict[HookPoint, FlatProgram]] = (
            OrderedDict()
        )
        self.model.register_forward_pre_hook(self._begin_pass, with_kwargs=True)

    # -- registration -------------------------------------------------------------------------

    def register(self, key: str, spec: SteeringSpec) -> None:
        self.specs[key] = spec
        points = {point for point, _ in spec.ops} | {read.point for read in spec.reads}
        if spec.scoped:
            parameter = next(self.model.parameters())
            table = ScopedTable(
                spec.token_gates, spec.scoped, self.saes, parameter.dtype, parameter.device
            )
            self.scoped_tables[key] = table
            points |= table.points
        for point in points:
            if point not in self.hooked:
                self._hook(point)
                self.hooked.add(point)

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.specs.pop(key, None)
            self.scoped_tables.pop(key, None)
        self._programs.clear()

    # -- per pass -------------------------------------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.current = None
        batch = self.runner.input_batch
        count = batch.num_reqs
        keys = tuple(self._key(request_id) for request_id in batch.req_ids[:count])
        if all(key is None for key in keys):
            return
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        total = int(self.runner.query_start_loc.cpu[count])
        rows = self.runner.req_indices.gpu[:total].to(positions.device)
        prompt_lengths = torch.from_numpy(batch.num_prompt_tokens[:count]).to(positions.device)
        is_prompt = positions[:total] < prompt_lengths[rows]
        programs = self._programs.get(keys)
        if programs is None:
            dtype = next(self.model.parameters()).dtype
            specs = [self.specs.get(key) if key else None for key in keys]
            programs = build_flat_programs(specs, keys, dtype, positions.device)
            self._programs[keys] = programs
            while len(self._programs) > PROGRAM_CACHE_SIZE:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(keys)
        starts = self.runner.query_start_loc.cpu[: count + 1].tolist()
        computed = batch.num_computed_tokens_cpu[:count].tolist()
        # per row: its first token's index in the pass, its token count there, the first one's
        # position (vLLM lays each row's tokens end to end, positions going on from its
        # computed tokens), from the CPU copies the runner keeps: no wait on the device
        spans = [(starts[r], starts[r + 1] - starts[r], computed[r]) for r in range(count)]
        reads = self._gate_reads(keys, batch, spans, positions.device)
        scoped = self._scoped(keys, batch, spans, is_prompt)
        self.current = _Pass(programs, rows, is_prompt, reads, scoped)

    def _scoped(
        self,
        keys: tuple[str | None, ...],
        batch: Any,
        spans: list[tuple[int, int, int]],
        is_prompt: torch.Tensor,
    ) -> ScopedPass | None:
        """This pass's token gates and scoped ops: per key that has them, the tokens of the rows
        naming it (and which are whose, where its ops are speaker-scoped)."""
        groups = []
        for key in dict.fromkeys(k for k in keys if k is not None and k in self.scoped_tables):
            table = self.scoped_tables[key]
            members = [row for row, named in enumerate(keys) if named == key]
            flat = [torch.arange(spans[r][0], spans[r][0] + spans[r][1]) for r in members]
            tokens = torch.cat(flat).to(is_prompt.device)
            speakers = {}
            if table.speakers:
                names = [name for r in members for name in self._speakers(batch, r, spans[r])]
                for speaker in table.speakers:
                    chosen = [name == speaker for name in names]
                    speakers[speaker] = torch.tensor(chosen, device=is_prompt.device)
            groups.append(Group(key, table, tokens, is_prompt[tokens], speakers))
        return ScopedPass(groups) if groups else None

    def _speakers(self, batch: Any, row: int, span: tuple[int, int, int]) -> list[str | None]:
        """The speaker of each of ``row``'s tokens in this pass, from its request's
        ``extra_args`` (None: nobody's)."""
        spoken = _extra_args(self.runner, batch.req_ids[row]).get(SPEAKERS_ARGS_KEY) or {}
        prompt, length = spoken.get("prompt"), int(batch.num_prompt_tokens[row])
        _, count, first = span
        return [
            spoken.get("generated")
            if position >= length
            else (None if prompt is None else prompt[position])
            for position in range(first, first + count)
        ]

    def _gate_reads(
        self,
        keys: tuple[str | None, ...],
        batch: Any,
        spans: list[tuple[int, int, int]],
        device: torch.device,
    ) -> dict[HookPoint, _Reads]:
        """Where this pass reads gates: for each row whose steering reads, its tokens at the
        offsets its reads' windows cover, counted from the prompt's last token (offset 0; a
        chunked prompt's earlier chunks read nothing; a reply gate's window goes on over the
        tokens the reply feeds back)."""
        found: dict[HookPoint, tuple[list[int], list[GateRead], list[tuple[str, int, int]]]] = {}
        for row, key in enumerate(keys):
            reads = self.specs[key].reads if key else ()
            if not reads:
                continue
            start, count, first = spans[row]
            last = int(batch.num_prompt_tokens[row]) - 1
            widest = max(read.window for read in reads)
            positions = range(max(first, last), min(first + count, last + widest))
            if not positions:
                continue
            request_id = _extra_args(self.runner, batch.req_ids[row])[PROBE_ARGS_KEY]
            for position in positions:
                offset = position - last
                if offset == 0 or request_id not in self.values:
                    self.values[request_id] = {}
                    while len(self.values) > READS_KEPT:
                        self.values.popitem(last=False)
                for read in reads:
                    if offset < read.window:
                        tokens, kept, labels = found.setdefault(read.point, ([], [], []))
                        tokens.append(start + position - first)
                        kept.append(read)
                        labels.append((request_id, read.gate, offset))
        return {
            point: _Reads(torch.tensor(tokens, device=device), reads, labels)
            for point, (tokens, reads, labels) in found.items()
        }

    def _read(self, point: HookPoint, reads: _Reads, stream: torch.Tensor) -> None:
        x = stream.index_select(0, reads.tokens)
        for index, (read, (request_id, gate, offset)) in enumerate(
            zip(reads.reads, reads.labels, strict=True)
        ):
            if read.unit is None:
                assert read.sae is not None
                value = self.saes[read.sae].encode(x[index : index + 1])[0, read.feature]
            else:
                value = x[index].float() @ read.unit.to(x.device)
            self.values[request_id][(gate, point.name, offset)] = float(value)

    def take_reads(self, request_ids: list[str]) -> dict[str, dict[tuple[int, int], float]]:
        """The values read so far for each id, summed per (gate, offset) over the gate's hooks;
        forgotten once taken."""
        taken = {}
        for request_id in request_ids:
            values = self.values.pop(request_id, None)
            if values is None:
                continue
            sums: dict[tuple[int, int], float] = {}
            for (gate, _, offset), value in values.items():
                sums[(gate, offset)] = sums.get((gate, offset), 0.0) + value
            taken[request_id] = sums
        return taken

    def _key(self, request_id: str) -> str | None:
        key = _extra_args(self.runner, request_id).get(EXTRA_ARGS_KEY)
        if key is not None and key not in self.specs:
            # never run a steered request unsteered: fail the pass instead
            raise RuntimeError(f"request {request_id} names steering {key} this worker lacks")
        return key

    def _at(
        self, point: HookPoint, target: torch.Tensor, stream: Callable[[], torch.Tensor]
    ) -> None:
        """This pass's reads, then its delta, at ``point``: ``target`` is what the delta is added
        to in place, ``stream()`` the residual-stream value there."""
        current = self.current
        if current is None:
            return
        reads = current.reads.get(point)
        program = current.programs.get(point)
        gates = current.scoped
        value = None
        if reads is not None:
            value = stream()
            self._read(point, reads, value)
        if gates is not None and point in gates.read_points:
            value = stream() if value is None else value
            gates.read(point, value)
        if program is not None:
            if not program.needs_stream:
                value = target  # an addition alone does not read the stream
            elif value is None:
                value = stream()
            program.apply(target, value, current.selection(program))
        if gates is not None:
            gates.apply(point, target, stream)

    # -- hooks ----------------------------------------------------------------------------------

    def _hook(self, point: HookPoint) -> None:
        if point.kind is HookKind.EMBED:
            self.embed.register_forward_hook(self._output_hook(point))
            return
        assert point.layer is not None
        layer: Any = self.layers[point.layer]
        if point.kind is HookKind.RESID_PRE:
            layer.register_forward_pre_hook(self._resid_pre_hook(point))
        elif point.kind is HookKind.RESID_POST:
            layer.register_forward_hook(self._resid_post_hook(point))
        elif point.kind is HookKind.ATTN_OUT:
            layer.self_attn.register_forward_hook(self._output_hook(point))
        elif point.kind is HookKind.MLP_OUT:
            layer.mlp.register_forward_hook(self._output_hook(point))
        else:  # refused in the service by check_request; never registered
            raise ValueError(f"no vLLM hook for {point.name}")

    def _output_hook(self, point: HookPoint) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self._at(point, output, lambda: output)
            return output

        return hook

    def _resid_pre_hook(self, point: HookPoint) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            hidden, residual = args[1], args[2]
            self._at(point, hidden, lambda: hidden if residual is None else hidden + residual)

        return hook

    def _resid_post_hook(self, point: HookPoint) -> Callable[..., tuple]:
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            hidden, residual = output
            self._at(point, hidden, lambda: hidden + residual)
            return output

        return hook


def _extra_args(runner: Any, request_id: str) -> dict[str, Any]:
    """The ``SamplingParams.extra_args`` of a request the runner holds (vLLM's own id for it)."""
    state = runner.requests.get(request_id)
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None) or {}


def _steering(worker: Any) -> WorkerSteering:
    state = getattr(worker, "steer_state", None)
    if state is None:
        state = WorkerSteering(worker.model_runner)
        worker.steer_state = state
    return state


def install(worker: Any) -> int:
    """Put steer's pass hook on this worker's model; returns its number of decoder layers."""
    return len(_steering(worker).layers)


def pack(value: Any) -> bytes:
    """``value`` as bytes for a ``collective_rpc`` argument or result.

    Where the workers run in other processes (tensor parallel, or an engine core of its own)
    vLLM sends them by msgpack, which turns a dataclass into a plain dict and a tuple key into
    a list; pickled bytes cross as they are. Only steer's own process sends them, to its own
    vLLM workers. Within one process arguments pass as they are (an SAE is not copied).
    """
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: Any) -> Any:
    """What :func:`pack` packed; anything else (sent within one process) as it is."""
    if not isinstance(data, bytes):
        return data
    return pickle.loads(data)  # bytes from this process tree only (pack)


def register(worker: Any, key: str, spec: SteeringSpec | bytes) -> None:
    """Register ``spec`` (packed where it crossed processes) under ``key``."""
    _steering(worker).register(key, unpack(spec))


def forget(worker: Any, keys: list[str]) -> None:
    _steering(worker).forget(keys)


def take_reads(worker: Any, request_ids: list[str]) -> bytes:
    """:meth:`WorkerSteering.take_reads`, packed (its keys are tuples)."""
    return pack(_steering(worker).take_reads(request_ids))


def register_sae(worker: Any, key: str, sae: SparseAutoencoder | bytes) -> None:
    """Keep ``sae`` (packed where it crossed processes) for the sliders that name ``key``
    (registered before their steering)."""
    _steering(worker).saes[key] = unpack(sae)


def forget_sae(worker: Any, key: str) -> None:
    _steering(worker).saes.pop(key, None)
