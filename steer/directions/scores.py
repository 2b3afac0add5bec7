"""Cheap teacher-forced measurements (no generation).

* refusal score (Arditi et al.): with ``p_R`` the next-token probability mass on the first tokens
  of refusal openers, ``score = log p_R - log(1 - p_R)``; > 0 means refusing is more likely
  than not.
* first-token KL ``KL(P_base || P_edited)`` of the next-token distributions, averaged over
  prompts.
* continuation log-probabilities and multi-token KL, teacher-forced over given continuations
  the way the engine generates them (the prompt pass, then the continuation as generated
  tokens, so phases and prompt gates act as in generation), chunk by chunk, so full-vocabulary
  logits for only a few prompts are ever held.

The scores read through :func:`steer.activations.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.activations import forward
from steer.gates import reply_gated
from steer.interventions import Intervention, Phase
from steer.models import ModelHandle
from steer.plan import build_plan

#: Openers whose first token marks a refusal. The first token of each, as the model's tokenizer
#: splits it, goes into p_R. For many tokenizers this includes the bare "I" (as in Arditi et
#: al.), which also starts some answers; the score is a cheap proxy that generation checks.
REFUSAL_OPENERS = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I cannot",
    "I can't",
    "I'm unable",
    "I am unable",
    "Sorry",
    "As an AI",
    "As a language model",
    "Unfortunately",
)


def refusal_token_ids(tokenizer: object) -> tuple[int, ...]:
    """First token ids of :data:`REFUSAL_OPENERS` (deduplicated, sorted)."""
    ids = set()
    for opener in REFUSAL_OPENERS:
        encoded = tokenizer(opener, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if encoded:
            ids.add(int(encoded[0]))
    return tuple(sorted(ids))


def next_token_logits(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """(n, vocab) float32 logits of the token after each prompt."""
    result = forward(
        handle, prompts, interventions=interventions, logits="last", batch_size=batch_size
    )
    assert isinstance(result.logits, torch.Tensor)
    return result.logits


def refusal_scores_from_logits(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """(n,) refusal scores from (n, vocab) next-token logits."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    log_refusal = torch.logsumexp(log_probs[:, list(token_ids)], dim=-1)
    # log(1 - p) computed stably from log p
    log_other = torch.log(-torch.expm1(log_refusal.clamp(max=-1e-12)))
    return (log_refusal - log_other).float()


def refusal_scores(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    *,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    ids = refusal_token_ids(handle.tokenizer) if token_ids is None else token_ids
    logits = next_token_logits(handle, prompts, interventions, batch_size=batch_size)
    return refusal_scores_from_logits(logits, ids)


def kl_divergence(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(base) || softmax(edited))`` over the last dimension."""
    base = torch.log_softmax(base_logits.double(), dim=-1)
    edited = torch.log_softmax(edited_logits.double(), dim=-1)
    return (base.exp() * (base - edited)).sum(-1).clamp_min(0.0).float()


def first_token_kl(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention],
    *,
    base_logits: torch.Tensor | None = None,
    edited_handle: ModelHandle | None = None,
    batch_size: int = 16,
) -> float:
    """Mean next-token KL between the base model and the edited one on ``prompts``.

    The edited model is ``handle`` with ``interventions``, or ``edited_handle`` (a baked model).
    """
    if base_logits is None:
        base_logits = next_token_logits(handle, prompts, batch_size=batch_size)
    if edited_handle is not None:
        edited = next_token_logits(edited_handle, prompts, interventions, batch_size=batch_size)
    else:
        edited = next_token_logits(handle, prompts, interventions, batch_size=batch_size)
    return float(kl_divergence(base_logits, edited).mean())


@torch.inference_mode()
def _continuation_logits(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    interventions: Sequence[Intervention],
) -> list[torch.Tensor]:
    """Per row, (len(continuation), vocab) logits predicting each continuation token, computed
    as the engine computes them while generating: the prompt in one pass (``Phase.PROMPT``;
    prompt-scope gates decide here), then the continuation's tokens in one pass over the cache
    as generated tokens (``Phase.GENERATED``); reply-scope gates first decide on the
    continuations' first tokens (:func:`steer.passes.reply_decisions`). So a phase-limited
    or gated intervention costs here what it costs in generation (one pass over prompt +
    continuation would decide a prompt gate on the continuation's last token and treat
    generated tokens as prompt)."""
    from steer.passes import forward_pass, prefill, reply_decisions

    rows, pad = len(prompts), handle.pad_token_id
    plan = build_plan(
        [interventions] * rows, handle.resolver, handle.d_model, handle.dtype, handle.device
    )
    decisions: list[dict[object, bool | float]] = [{} for _ in range(rows)]
    gates = reply_gated(interventions)
    if gates:  # decided on the continuations' first tokens, then held from the prompt on
        decisions = reply_decisions(handle, plan, prompts, continuations, gates)
    last, cache, mask = prefill(handle, plan, prompts, decisions)
    logits = last[:, None, :]
    steps = max(len(c) for c in continuations) - 1
    if steps > 0:  # right padding: a causal model's real tokens never see it
        fed = torch.tensor([list(c[:-1]) + [pad] * (steps + 1 - len(c)) for c in continuations])
        tokens = (
            fed,
            torch.cat([mask, torch.ones(rows, steps, dtype=mask.dtype)], 1),
            torch.tensor([[len(p) + i for i in range(steps)] for p in prompts]),
        )
        rest = forward_pass(handle, plan, Phase.GENERATED, tokens, cache, decisions, keep=0)
        logits = torch.cat([logits, rest], 1)
    return [logits[i, : len(c)].cpu() for i, c in enumerate(continuations)]


def continuation_logprobs(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    *,
    chunk_size: int = 4,
) -> torch.Tensor:
    """(n,) mean log-probability per token of each continuation given its prompt."""
    means = []
    for start in range(0, len(prompts), chunk_size):
        chunk_p = prompts[start : start + chunk_size]
        chunk_c = continuations[start : start + chunk_size]
        for logits, continuation in zip(
            _continuation_logits(handle, chunk_p, chunk_c, interventions), chunk_c, strict=True
        ):
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            picked = log_probs.gather(1, torch.tensor(list(continuation))[:, None])
            means.append(float(picked.mean()))
    return torch.tensor(means)


def token_kls(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    *,
    edited_handle: ModelHandle | None = None,
    chunk_size: int = 4,
) -> list[list[float]]:
    """Per prompt, the KL (base || edited) at each token of its continuation, teacher-forced
    over the base model's continuations (non-empty)."""
    rows: list[list[float]] = []
    edited_model = edited_handle or handle
    for start in range(0, len(prompts), chunk_size):
        chunk_p = prompts[start : start + chunk_size]
        chunk_c = continuations[start : start + chunk_size]
        base = _continuation_logits(handle, chunk_p, chunk_c, ())
        edited = _continuation_logits(edited_model, chunk_p, chunk_c, interventions)
        for base_row, edited_row in zip(base, edited, strict=True):
            rows.append(kl_divergence(base_row, edited_row).tolist())
    return rows


def kl_means(rows: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(first-token KL, multi-token KL) of :func:`token_kls` rows: the mean of each row's first
    value, and the mean over every token of every row."""
    every = [value for row in rows for value in row]
    first = float(torch.tensor([row[0] for row in rows]).mean())
    return first, float(torch.tensor(every).mean())


def multi_token_kl(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    interventions: Sequence[Intervention] = (),
    *,
    edited_handle: ModelHandle | None = None,
    chunk_size: int = 4,
) -> tuple[float, float]:
    """(first-token KL, multi-token KL) teacher-forced over the base model's continuations.

    Position 0 of each continuation is the first-token KL; the multi-token KL averages every
    continuation position of every prompt. Continuations must be non-empty.
    """
    rows = token_kls(
        handle,
        prompts,
        continuations,
        interventions,
        edited_handle=edited_handle,
        chunk_size=chunk_size,
    )
    return kl_means(rows)
