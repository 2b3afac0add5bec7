"""SamplingParams <-> :class:`~steer.sampling.SamplingConfig`, from one table of the fields
they share by name; the HTTP front end hands its parsed sampler settings over through it."""

from __future__ import annotations

from typing import Any

from steer.errors import InvalidArgumentError, SteerError, within
from steer.proto.v1 import generation_pb2
from steer.sampling import SamplingConfig

#: SamplingParams fields that map one to one onto SamplingConfig fields of the same name
_SCALAR_SAMPLING_FIELDS = (
    "temperature",
    "temperature_last",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "tfs",
    "top_a",
    "mirostat_mode",
    "mirostat_tau",
    "mirostat_eta",
    "repetition_penalty",
    "repetition_penalty_range",
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_range",
    "xtc_threshold",
    "xtc_probability",
    "ban_eos",
    "min_tokens",
)


def sampling_params(config: SamplingConfig) -> generation_pb2.SamplingParams:
    """The inverse of :func:`sampling_config` (the seed travels beside it): how the HTTP front
    end hands its parsed sampler settings to the one conversion both front ends share."""
    params = generation_pb2.SamplingParams(
        dry_sequence_breakers=list(config.dry_sequence_breakers),
        banned_strings=list(config.banned_strings),
        sampler_order=list(config.sampler_order or ()),
    )
    for name in _SCALAR_SAMPLING_FIELDS:
        setattr(params, name, getattr(config, name))
    for token, bias in config.logit_bias:
        params.logit_bias[token] = bias
    return params


def sampling_config(params: generation_pb2.SamplingParams, seed: int | None) -> SamplingConfig:
    values: dict[str, Any] = {"seed": seed}
    for name in _SCALAR_SAMPLING_FIELDS:
        if params.HasField(name):
            values[name] = getattr(params, name)
    for name in ("dry_sequence_breakers", "banned_strings", "sampler_order"):
        if getattr(params, name):
            values[name] = tuple(getattr(params, name))
    if params.logit_bias:
        values["logit_bias"] = tuple(sorted(params.logit_bias.items()))
    try:
        return SamplingConfig(**values)
    except SteerError as error:
        if error.field == "seed":
            raise InvalidArgumentError(error.message, field="seed") from None
        raise within(error, "sampling") from None
