"""A steer request's sampler settings as vLLM ``SamplingParams``.

vLLM has temperature, top-k, top-p, min-p, the repetition, presence and frequency penalties,
logit bias, min tokens and seeds of its own; steer's other RP samplers (DRY, XTC, mirostat, TFS,
typical, top-a, banned strings, temperature last, a sampler order, a repetition-penalty range)
are refused for this backend by :data:`SAMPLER_FIELDS` (see :func:`steer.backends.check_request`).
vLLM's definitions differ from steer's in two places, so sampled (not greedy) text differs
between backends for the same seed: vLLM draws with its own generator, and its presence and
frequency penalties count generated tokens only (OpenAI's definition; steer's count the prompt
too).

Text, stop strings and EOS are steer's: vLLM returns token ids only (``detokenize=False``) and
:class:`~steer.text.TextStream` turns them into text exactly as in the hf engine.
"""

from __future__ import annotations

from typing import Any

from steer.generation import GenerationRequest

#: SamplingConfig fields the vllm backend honours (the others must keep their defaults)
SAMPLER_FIELDS = frozenset(
    {
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "ban_eos",
        "min_tokens",
        "seed",
    }
)


def sampling_params(
    request: GenerationRequest, seed: int, eos_ids: frozenset[int], key: str | None
) -> Any:
    """vLLM SamplingParams for ``request`` (``key``: its registered steering, or None)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = request.sampling
    greedy = sampling.greedy
    min_tokens = request.max_new_tokens if sampling.ban_eos else sampling.min_tokens
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0 if greedy else sampling.top_k,
        min_p=0.0 if greedy else sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias={int(token): float(bias) for token, bias in sampling.logit_bias} or None,
        seed=None if greedy else seed,
        max_tokens=request.max_new_tokens,
        min_tokens=min(min_tokens, request.max_new_tokens),
        stop_token_ids=sorted(eos_ids),
        logprobs=request.top_logprobs or None,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=None if key is None else {"steer": key},
    )
