"""The pipeline: run the active processors in order, then draw a token (or Mirostat)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from steer.sampling.config import SamplingConfig
from steer.sampling.processors import PENALTIES, SAMPLERS, RowContext, SamplerState


def process(
    logits: torch.Tensor,
    config: SamplingConfig,
    history: Sequence[int] = (),
    row: RowContext | None = None,
) -> torch.Tensor:
    """Run every active processor on one row's float32 logits (vocab,)."""
    row = row if row is not None else RowContext(history=history)
    order = config.order()
    if config.mirostat_mode:
        order = tuple(n for n in order if n in PENALTIES or n == "temperature")
    for name in order:
        processor = SAMPLERS[name]
        if processor.is_active(config):
            logits = processor(logits, config, row)
    return logits


#: tokens per block of :func:`draw`'s two-level search
_BLOCK = 1024


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index from the (unnormalised, non-negative) ``probs``: the first whose running sum
    passes a uniform draw times the total, so never a zero-probability index; one float64 number
    from ``generator`` per call. The running sum is taken in two levels, over blocks of
    :data:`_BLOCK` tokens and then inside the block the draw falls in, in float64: about
    thirty times faster than ``torch.multinomial`` on a 128k vocabulary (which spent most of a
    GPU decode step on the CPU, docs/backends.md)."""
    point = torch.rand((), generator=generator, dtype=torch.float64)
    blocks = torch.nn.functional.pad(probs, (0, -probs.numel() % _BLOCK)).view(-1, _BLOCK)
    totals = blocks.sum(1, dtype=torch.float64).cumsum(0)
    point = point * totals[-1]
    block = int(torch.searchsorted(totals, point, right=True))
    if block >= len(totals):  # the product rounded up to the total: the last token with mass
        return int(torch.nonzero(probs).max())
    running = blocks[block].double().cumsum(0)
    if block:
        running += totals[block - 1]
    index = int(torch.searchsorted(running, point, right=True))
    if index >= _BLOCK:  # the block's sum and its running sum rounded apart
        index = int(torch.nonzero(blocks[block]).max())
    return block * _BLOCK + index


def _mirostat_k(epsilon: float, s_hat: float, mu: float, vocab: int) -> int:
    """Mirostat 1's ``k = ((e 2^mu) / (1 - N^-e))^(1/s_hat)`` in [1, vocab], overflow-safe."""
    if abs(epsilon) < 1e-9 or s_hat <= 0:
        return vocab
    try:
        k_float = ((epsilon * 2**mu) / (1 - vocab**-epsilon)) ** (1 / s_hat)
    except (OverflowError, ZeroDivisionError):
        return vocab
    if isinstance(k_float, complex) or not math.isfinite(k_float):
        return vocab
    return int(min(max(k_float, 1), vocab))


def mirostat_truncate(
    logits: torch.Tensor, config: SamplingConfig, state: SamplerState
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirostat's distribution for one step: the kept tokens' probabilities (the others 0) over
    the vocabulary sorted by probability, and that order. ``state.mirostat_mu`` starts at
    ``2 tau``; :func:`mirostat_update` moves it once the token is drawn."""
    if state.mirostat_mu is None:
        state.mirostat_mu = 2 * config.mirostat_tau
    mu = state.mirostat_mu
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    if config.mirostat_mode == 1:
        top = probs[:100].clamp_min(1e-30)
        steps = torch.arange(len(top) - 1, dtype=torch.float64)
        t = torch.log((steps + 2) / (steps + 1))
        b = torch.log(top[:-1].double() / top[1:].double())
        s_hat = float((t * b).sum() / (t * t).sum()) if len(top) > 1 else 1.0
        epsilon = s_hat - 1
        vocab = probs.numel()
        k = _mirostat_k(epsilon, s_hat, mu, vocab)
        keep = torch.arange(vocab) < k
    else:
        keep = -torch.log2(probs) <= mu
        keep[0] = True
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(), order


def mirostat_update(state: SamplerState, config: SamplingConfig, probability: float) -> None:
    """Move ``mu`` by the surprise of the drawn token (its probability in the kept
    distribution)."""
    assert state.mirostat_mu is not None
    surprise = -math.log2(probability)
    state.mirostat_mu = state.mirostat_mu - config.mirostat_eta * (surprise - config.mirostat_tau)


def _mirostat(logits: torch.Tensor, config: SamplingConfig, row: RowContext) -> int:
    kept, order = mirostat_truncate(logits, config, row.state)
    index = draw(kept, row.generator)
    mirostat_update(row.state, config, float(kept[index]))
    return int(order[index].item())


def choose(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    history: Sequence[int] = (),
    state: SamplerState | None = None,
    banned_tokens: Iterable[int] = (),
) -> int:
    """Pick the next token for one row; ``banned_tokens`` are masked before anything runs."""
    row = RowContext(history, generator, state if state is not None else SamplerState())
    banned = list(banned_tokens)
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned), -math.inf)
    if config.greedy:
        if config.mirostat_mode or any(SAMPLERS[n].is_active(config) for n in config.order()):
            logits = process(logits, config, row=row)
        return int(torch.argmax(logits).item())
    logits = process(logits, config, row=row)
    if config.mirostat_mode:
        return _mirostat(logits, config, row)
    probs = torch.softmax(logits, dim=-1)
    return draw(probs, generator)
