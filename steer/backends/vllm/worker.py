"""The part of the vLLM backend that lives in vLLM's worker processes.

:func:`install`, :func:`register` and :func:`forget` are sent to every worker with
``collective_rpc`` (module-level functions taking the worker first). :func:`install` puts one
forward pre-hook on the model that reads, once per pass, which request each token belongs to
(``runner.req_indices``), each row's steering key (``SamplingParams.extra_args``) and each token's
phase (its position against its request's prompt length); hooks at the hook points that
registered steering uses then add their :class:`~steer.backends.vllm.program.FlatProgram` delta.

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

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from steer.backends.vllm.program import (
    EXTRA_ARGS_KEY,
    FlatProgram,
    Selection,
    SteeringSpec,
    build_flat_programs,
)
from steer.hooks import HookKind, HookPoint

#: batch compositions whose stacked programs are kept
PROGRAM_CACHE_SIZE = 64


class _Pass:
    """What the hooks of one forward pass need: the batch's programs and, per set of steered
    rows, which tokens they own (worked out once per pass, shared by every point)."""

    def __init__(
        self, programs: dict[HookPoint, FlatProgram], rows: torch.Tensor, is_prompt: torch.Tensor
    ) -> None:
        self.programs = programs
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
        self.hooked: set[HookPoint] = set()
        self.current: _Pass | None = None
        self._programs: OrderedDict[tuple[str | None, ...], dict[HookPoint, FlatProgram]] = (
            OrderedDict()
        )
        self.model.register_forward_pre_hook(self._begin_pass, with_kwargs=True)

    # -- registration -------------------------------------------------------------------------

    def register(self, key: str, spec: SteeringSpec) -> None:
        self.specs[key] = spec
        for point, _ in spec.ops:
            if point not in self.hooked:
                self._hook(point)
                self.hooked.add(point)

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.specs.pop(key, None)
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
        self.current = _Pass(programs, rows, is_prompt)

    def _key(self, request_id: str) -> str | None:
        state = self.runner.requests.get(request_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        key = extra.get(EXTRA_ARGS_KEY)
        if key is not None and key not in self.specs:
            # never run a steered request unsteered: fail the pass instead
            raise RuntimeError(f"request {request_id} names steering {key} this worker lacks")
        return key

    def _program(self, point: HookPoint) -> tuple[FlatProgram, Selection] | None:
        current = self.current
        program = None if current is None else current.programs.get(point)
        if current is None or program is None:
            return None
        return program, current.selection(program)

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
            found = self._program(point)
            if found is not None:
                found[0].apply(output, output, found[1])
            return output

        return hook

    def _resid_pre_hook(self, point: HookPoint) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            found = self._program(point)
            if found is not None:
                program, selection = found
                hidden, residual = args[1], args[2]
                plain = residual is None or not program.needs_stream
                program.apply(hidden, hidden if plain else hidden + residual, selection)

        return hook

    def _resid_post_hook(self, point: HookPoint) -> Callable[..., tuple]:
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            found = self._program(point)
            if found is not None:
                program, selection = found
                hidden, residual = output
                stream = hidden + residual if program.needs_stream else hidden
                program.apply(hidden, stream, selection)
            return output

        return hook


def _steering(worker: Any) -> WorkerSteering:
    state = getattr(worker, "steer_state", None)
    if state is None:
        state = WorkerSteering(worker.model_runner)
        worker.steer_state = state
    return state


def install(worker: Any) -> int:
    """Put steer's pass hook on this worker's model; returns its number of decoder layers."""
    return len(_steering(worker).layers)


def register(worker: Any, key: str, spec: SteeringSpec) -> None:
    _steering(worker).register(key, spec)


def forget(worker: Any, keys: list[str]) -> None:
    _steering(worker).forget(keys)
