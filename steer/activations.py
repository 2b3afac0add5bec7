"""Teacher-forced forward passes: read activations and logits, with or without interventions.

:func:`forward` runs prompts in left-padded batches (so position ``-1`` is every prompt's last
token) and keeps only what was asked for, on the CPU in float32: activations at the chosen hook
points and token positions, and logits at the last or all positions. Memory stays bounded by one
batch however many prompts there are. It attaches hooks through :func:`steer.runtime.attach`,
the same path generation uses, so a direction read here and applied there means the same thing.
A pass that keeps no logits ends once every hook point asked for is read: the blocks after the
last of them never run (a read at the middle block takes about half the time; the values are
the same, bit for bit). :func:`read_last` takes what was read before (:data:`KnownReads`)
instead of reading it again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from steer.errors import InvalidArgumentError
from steer.gates import reply_gated
from steer.interventions import Intervention, Phase, validate
from steer.models import ModelHandle
from steer.plan import build_plan
from steer.runtime import HookFn, attach, compose, recorder
from steer.text import encode_chat, post_instruction_positions

#: "last", "all", or explicit negative offsets from the end (e.g. (-3, -2, -1))
Positions = Literal["last", "all"] | Sequence[int]

#: encoding prompts lives in steer.text; kept importable here for the callers that read with it
__all__ = [
    "ForwardResult",
    "KnownReads",
    "Positions",
    "encode_chat",
    "forward",
    "post_instruction_positions",
    "read_last",
]


@dataclass
class ForwardResult:
    #: hook name -> (n_prompts, n_positions, d_model), or a list of (tokens, d_model) for "all"
    activations: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)
    #: (n_prompts, vocab) for "last", or a list of (tokens, vocab) for "all"
    logits: torch.Tensor | list[torch.Tensor] | None = None


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, str):
        if positions not in ("last", "all"):
            raise InvalidArgumentError("use 'last', 'all' or negative offsets", field="positions")
        return
    if not positions or any(int(p) >= 0 for p in positions):
        raise InvalidArgumentError(
            "explicit positions are negative offsets from the end, e.g. (-1,)", field="positions"
        )


def forward(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    *,
    interventions: Sequence[Intervention] = (),
    hooks: Sequence[str] = (),
    positions: Positions = "last",
    logits: Literal["none", "last", "all"] = "none",
    batch_size: int = 16,
    progress: bool = False,
) -> ForwardResult:
    """Run ``prompts`` (token id lists) and collect activations and/or logits."""
    _check_positions(positions)
    points = [handle.resolver.parse(name, field="hooks") for name in hooks]
    validate(interventions, handle.resolver, handle.d_model)
    if reply_gated(interventions):
        raise InvalidArgumentError(
            "a reply-scope gate decides on the reply's first tokens, which one pass over a "
            "prompt has not got: generate (steer.generation.Engine) or score continuations "
            "(steer.directions.scores.token_kls)",
            field="interventions",
        )
    if any(len(p) == 0 for p in prompts):
        raise InvalidArgumentError("empty prompt", field="prompts")
    stores: dict[str, list[torch.Tensor]] = {point.name: [] for point in points}
    logit_store: list[torch.Tensor] = []
    lengths: list[int] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="forward", disable=not progress):
        batch = [list(p) for p in prompts[start : start + batch_size]]
        lengths.extend(len(p) for p in batch)
        _run_batch(handle, batch, interventions, points, positions, logits, stores, logit_store)
    result = ForwardResult()
    for name, chunks in stores.items():
        result.activations[name] = _gather(chunks, positions, lengths)
    if logits != "none":
        result.logits = _gather(logit_store, "all" if logits == "all" else "last", lengths)
    return result


#: prompts' last-token activations read before, by their token ids, then hook name: (d_model,)
#: each, float32 on the CPU (what a direction search keeps of its train reads for a gate,
#: :func:`steer.directions.pipeline.filtered_train_activations`)
KnownReads = Mapping[tuple[int, ...], Mapping[str, torch.Tensor]]


def read_last(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    hooks: Sequence[str],
    *,
    batch_size: int = 16,
    known: KnownReads | None = None,
) -> dict[str, torch.Tensor]:
    """(prompts, d_model) at each of ``hooks`` at each prompt's last token, as :func:`forward`
    reads them: from ``known`` where it holds the prompt at every hook, the rest read in one
    pass (the values may then differ from one pass over all of them by float rounding, as
    batches of other prompts pad differently)."""
    held = [(known or {}).get(tuple(prompt), {}) for prompt in prompts]
    missing = [i for i, values in enumerate(held) if not all(hook in values for hook in hooks)]
    fresh: dict[str, torch.Tensor] = {}
    if missing:
        chosen = prompts if len(missing) == len(prompts) else [prompts[i] for i in missing]
        read = forward(handle, chosen, hooks=hooks, batch_size=batch_size).activations
        fresh = {hook: read[hook] for hook in hooks}  # type: ignore[misc]
        if len(missing) == len(prompts):
            return fresh
    row = {index: position for position, index in enumerate(missing)}
    return {
        hook: torch.stack([
            fresh[hook][row[i]] if i in row else held[i][hook].float() for i in range(len(prompts))
        ])
        for hook in hooks
    }  # fmt: skip


def _select(positions: Positions):  # type: ignore[no-untyped-def]
    def select(x: torch.Tensor) -> torch.Tensor:
        if positions == "last":
            return x[:, -1:, :]
        if positions == "all":
            return x
        return x[:, [int(p) for p in positions], :]

    return select


def _gather(
    chunks: list[torch.Tensor], positions: Positions, lengths: list[int]
) -> torch.Tensor | list[torch.Tensor]:
    if positions == "all":
        rows = [row for chunk in chunks for row in chunk]
        return [row[-length:] for row, length in zip(rows, lengths, strict=True)]
    stacked = torch.cat(chunks) if chunks else torch.empty(0)
    return stacked[:, 0, :] if positions == "last" and stacked.ndim == 3 else stacked


@torch.inference_mode()
def _run_batch(
    handle: ModelHandle,
    batch: list[list[int]],
    interventions: Sequence[Intervention],
    points: list,  # list[HookPoint]
    positions: Positions,
    logits: str,
    stores: dict[str, list[torch.Tensor]],
    logit_store: list[torch.Tensor],
) -> None:
    width = max(len(p) for p in batch)
    pad = handle.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    plan = build_plan(
        [interventions] * len(batch),
        handle.resolver,
        handle.d_model,
        handle.dtype,
        handle.device,
    )
    functions: dict = dict(plan.hooks(Phase.PROMPT))
    select = _select(positions)
    # without logits the pass ends once every point is read: the blocks after the last of them
    # (and the head) would change nothing that is kept
    stop = _stopper(len(set(points))) if logits == "none" and points else None
    for point in points:
        record: HookFn = recorder(stores[point.name], select)
        if stop is not None:
            record = compose(record, stop)
        steer = functions.get(point)
        functions[point] = record if steer is None else compose(steer, record)
    device = handle.device
    try:
        with attach(handle.resolver, functions):
            output = handle.model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=False,
                logits_to_keep=0 if logits == "all" else 1,
            )
    except _AllRead:
        return
    if logits == "last":
        logit_store.append(output.logits[:, -1:, :].float().cpu())
    elif logits == "all":
        logit_store.append(output.logits.float().cpu())


class _AllRead(Exception):
    """Raised by the last hook of a pass that keeps no logits, to end it there."""


def _stopper(count: int) -> HookFn:
    """A hook function that raises :class:`_AllRead` at its ``count``-th call (one per point
    read, in whatever order the architecture reaches them)."""
    calls = [0]

    def stop(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] >= count:
            raise _AllRead
        return x

    return stop
