"""The engine's forward passes, shared with teacher-forced scoring.

:func:`forward_pass` runs one pass with a plan's hooks for a phase into a KV cache; :func:`prefill`
is the prompt pass (prompt gates decide there); :func:`reply_decisions` takes reply-scope gates'
decisions on given continuations as the engine takes them on the tokens it draws, and
:func:`reply_windows` reads the residuals those gates read, for calibrating them. The engine
(:mod:`steer.generation`) and :mod:`steer.directions.scores` both go through them, so an edit
scored on fixed continuations costs what it costs in generation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from steer.activations import forward
from steer.gates import Gated, check_reply_tokens
from steer.interventions import Phase
from steer.models import ModelHandle
from steer.plan import InterventionPlan, Window
from steer.runtime import attach, cache_keyword


def forward_pass(
    handle: ModelHandle,
    plan: InterventionPlan,
    phase: Phase,
    tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cache: Any,
    decisions: Sequence[dict[object, bool | float]],
    speakers: Sequence[Sequence[str | None]] | None = None,
    *,
    held: bool = False,
    keep: int = 1,
    keyword: str | None = None,
) -> torch.Tensor:
    """One forward pass with ``plan``'s hooks for ``phase`` over ``tokens`` (input ids, attention
    mask, position ids) into ``cache``: float logits of the last ``keep`` positions (0 = all),
    (rows, positions, vocab). ``decisions``: each row's prompt-gate decisions (see
    :meth:`~steer.plan.InterventionPlan.hooks`); ``keyword``: :func:`cache_keyword`, if known."""
    device = handle.device
    input_ids, mask, positions = tokens
    with attach(handle.resolver, plan.hooks(phase, speakers, decisions, held)):
        output = handle.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            **{keyword or cache_keyword(handle.model): cache},
            use_cache=True,
            logits_to_keep=keep,
        )
    return output.logits.float()


def prefill(
    handle: ModelHandle,
    plan: InterventionPlan,
    prompts: Sequence[Sequence[int]],
    decisions: Sequence[dict[object, bool | float]],
    speakers: Sequence[Sequence[str | None]] | None = None,
    *,
    keyword: str | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prompt pass over left-padded ``prompts`` into a new cache: (last logits (rows, vocab),
    cache, attention mask). Prompt gates decide here; where one fired for an edit before its
    condition's hook (:meth:`~steer.plan.InterventionPlan.refills`) the pass runs again with the
    decisions held, so that request runs as with the edit always on, prompt included, and the
    rows whose gates did not fire come out as before."""
    from transformers.cache_utils import DynamicCache

    width = max(len(prompt) for prompt in prompts)
    pad = handle.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    tokens = (input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    for held in (False, True):
        if held and not plan.refills(decisions):
            break
        cache = DynamicCache(config=handle.model.config)
        logits = forward_pass(
            handle,
            plan,
            Phase.PROMPT,
            tokens,
            cache,
            decisions,
            speakers,
            held=held,
            keyword=keyword,
        )
    return logits[:, -1, :], cache, mask


def reply_decisions(
    handle: ModelHandle,
    plan: InterventionPlan,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    gates: Sequence[Gated],
) -> list[dict[object, bool | float]]:
    """Each row's decisions for the reply-scope ``gates`` (those of ``plan``), taken on the given
    ``replies`` (non-empty) as the engine takes them on the tokens it draws: read at the prompt's
    last token, then one reply token per pass, until each gate has read its window or the reply
    ends. For scoring an edit on fixed continuations (:func:`steer.directions.scores.token_kls`);
    pass the decisions to :func:`prefill` and :func:`forward_pass`."""
    decisions: list[dict[object, bool | float]] = [{} for _ in prompts]
    _, cache, mask = prefill(handle, plan, prompts, decisions)
    pad = handle.pad_token_id
    for read in itertools.count(1):  # positions read so far in every row
        for row, reply in zip(decisions, replies, strict=True):
            for gate in gates:
                assert gate.reply_tokens is not None
                if gate in row:
                    continue
                if row.get(Window(gate)):
                    row[gate] = True
                elif read >= gate.reply_tokens or read >= len(reply):
                    row[gate] = gate.window_fires(row, read)
        if all(gate in row for row in decisions for gate in gates):
            return decisions
        fed = torch.tensor([[r[read - 1] if read <= len(r) else pad] for r in replies])
        mask = torch.cat([mask, torch.ones(len(replies), 1, dtype=mask.dtype)], 1)
        positions = torch.tensor([[len(p) + read - 1] for p in prompts])
        forward_pass(handle, plan, Phase.GENERATED, (fed, mask, positions), cache, decisions)
    raise AssertionError("unreachable")


def reply_windows(
    handle: ModelHandle, prompts: list[list[int]], hooks: list[str], count: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """{hook: (prompts, count, d_model)}: the residuals at the positions that draw each prompt's
    first ``count`` greedy reply tokens (generated without interventions), teacher-forced. A
    reply that ends sooner has fewer such positions; their mean fills the window, which leaves
    both their largest projection and their mean projection as they are (what an "any" and a
    "mean" gate read: a projection is linear). What
    :func:`steer.calibration.read_prompts` reads for a reply-scope gate: the positions
    :func:`reply_decisions` reads, in one teacher-forced pass."""
    from steer.directions.steering import greedy  # it runs the engine, which imports this

    check_reply_tokens(count)
    # the window's last position draws token K, so only the first K - 1 are fed
    replies = greedy(handle, [(prompts, count - 1)])[0] if count > 1 else [[] for _ in prompts]
    ends = set(handle.eos_token_ids)  # the engine feeds no token after an end token
    replies = [r[: next((i for i, t in enumerate(r) if t in ends), len(r))] for r in replies]
    fed = [p + r for p, r in zip(prompts, replies, strict=True)]
    offsets = tuple(range(-count, 0))
    activations = forward(handle, fed, hooks=hooks, positions=offsets, batch_size=batch_size)
    windows = {}
    for hook in hooks:
        read = activations.activations[hook]
        assert isinstance(read, torch.Tensor)
        rows = read.clone()  # (prompts, count, d_model)
        for index, reply in enumerate(replies):
            missing = count - 1 - len(reply)
            if missing:
                rows[index, :missing] = rows[index, missing:].mean(0)
        windows[hook] = rows
    return windows
