"""A steer request's sampler settings as vLLM ``SamplingParams``.

vLLM has temperature, top-k, top-p, min-p, the repetition, presence and frequency penalties,
logit bias, min tokens and seeds of its own (:data:`NATIVE_FIELDS`); a request that uses only
those is sampled by vLLM's samplers. A request that sets any of steer's other RP samplers (DRY,
XTC, Mirostat, TFS, typical, top-a, temperature last, a sampler order, a repetition-penalty
range, banned strings) is sent with vLLM's samplers neutral and its settings in ``extra_args``,
and :class:`steer.backends.vllm.samplers.SteerSamplers` runs steer's pipeline on its logits.

vLLM's definitions differ from steer's in two places, so sampled (not greedy) text differs
between backends for the same seed: vLLM draws with its own generator, and its presence and
frequency penalties count generated tokens only (OpenAI's definition; steer's count the prompt
too; a request on steer's pipeline counts the prompt, as the hf engine does).

Text, stop strings and EOS are steer's: vLLM returns token ids only (``detokenize=False``) and
:class:`~steer.text.TextStream` turns them into text exactly as in the hf engine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from steer.backends.vllm.program import EXTRA_ARGS_KEY, PROBE_ARGS_KEY, SPEAKERS_ARGS_KEY
from steer.generation import GenerationRequest
from steer.sampling import SamplingConfig
from steer.sampling.processors import SamplerState

#: SamplingConfig fields vLLM samples with itself
NATIVE_FIELDS = frozenset(
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
#: SamplingConfig fields the vllm backend honours: every one (those not in NATIVE_FIELDS through
#: steer's pipeline inside vLLM)
SAMPLER_FIELDS = frozenset(item.name for item in fields(SamplingConfig))
#: the ``extra_args`` key carrying the settings of a request on steer's pipeline
PIPELINE_KEY = "steer_sampling"


def needs_pipeline(config: SamplingConfig) -> bool:
    """Whether ``config`` sets a sampler vLLM does not have."""
    return not NATIVE_FIELDS.issuperset(config.changed_fields())


def encode(config: SamplingConfig, state: SamplerState) -> str:
    """``config`` and its tokenizer-resolved state as the text ``extra_args`` carries."""
    return json.dumps({"config": asdict(config), "dry_breakers": sorted(state.dry_breakers)})


def decode(text: str) -> tuple[SamplingConfig, SamplerState]:
    data = json.loads(text)
    state = SamplerState(dry_breakers=frozenset(int(t) for t in data["dry_breakers"]))
    return SamplingConfig(**data["config"]), state


def sampling_params(
    request: GenerationRequest,
    seed: int,
    eos_ids: frozenset[int],
    key: str | None,
    pipeline: str | None = None,
    speakers: dict[str, Any] | None = None,
    read_id: str | None = None,
) -> Any:
    """vLLM SamplingParams for ``request`` (``key``: its registered steering, or None;
    ``pipeline``: its settings as :func:`encode` writes them, when it :func:`needs_pipeline`;
    ``speakers``: its tokens' speakers, when its steering is speaker-scoped; ``read_id``: the
    id its reply gates' reads are kept under, when it has some)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = request.sampling
    greedy = sampling.greedy
    min_tokens = request.max_new_tokens if sampling.ban_eos else sampling.min_tokens
    extra = _steering_args(key, speakers, read_id)
    native = sampling
    if pipeline is not None:  # steer's pipeline does every sampler; vLLM's stay neutral
        extra[PIPELINE_KEY] = pipeline
        native = SamplingConfig(temperature=0.0 if greedy else 1.0)
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else native.temperature,
        top_p=1.0 if greedy else native.top_p,
        top_k=0 if greedy else native.top_k,
        min_p=0.0 if greedy else native.min_p,
        repetition_penalty=native.repetition_penalty,
        presence_penalty=native.presence_penalty,
        frequency_penalty=native.frequency_penalty,
        logit_bias={int(token): float(bias) for token, bias in native.logit_bias} or None,
        seed=None if greedy else seed,
        max_tokens=request.max_new_tokens,
        min_tokens=min(min_tokens, request.max_new_tokens),
        stop_token_ids=sorted(eos_ids),
        logprobs=request.top_logprobs or None,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra or None,
    )


def probe_params(key: str, probe_id: str, speakers: dict[str, Any] | None = None) -> Any:
    """vLLM SamplingParams of a gate probe (:mod:`steer.backends.vllm.gates`): one greedy token,
    nothing returned but the end; ``key`` names its steering (its reads), ``probe_id`` the id
    the workers keep its reads under, ``speakers`` as for :func:`sampling_params`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=0.0,
        max_tokens=1,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=_steering_args(key, speakers, probe_id),
    )


def _steering_args(
    key: str | None, speakers: dict[str, Any] | None, read_id: str | None
) -> dict[str, Any]:
    """What ``extra_args`` tells the workers: the steering's key, the tokens' speakers, and the
    id gate reads are kept under (each only where there is one)."""
    extra: dict[str, Any] = {}
    for name, value in (
        (EXTRA_ARGS_KEY, key),
        (SPEAKERS_ARGS_KEY, speakers),
        (PROBE_ARGS_KEY, read_id),
    ):
        if value is not None:
            extra[name] = value
    return extra
