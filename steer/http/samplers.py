"""Sampler fields of a request body, as every dialect names them, mapped onto steer's one
sampler pipeline: :func:`sampling_config`, the sampler order, and the samplers steer does not have.

Sampler order. ``SamplingConfig.sampler_order`` lists the processors that run, so a client's
partial order is completed: the samplers it names take the places those samplers hold in
:data:`~steer.sampling.DEFAULT_ORDER`, in the client's order, and every other sampler stays where it
is. KoboldCpp's integers: 0 top_k, 1 top_a, 2 top_p (with min_p), 3 tfs, 4 typical, 5 temperature,
6 repetition penalty (with presence and frequency penalties); DRY runs first and XTC last as in
KoboldCpp. Names (text-generation-webui, Aphrodite, llama.cpp's ``samplers`` list) that steer has
no sampler for are skipped, and so are names nobody defines, so that a front end adding a sampler
does not break requests. llama.cpp leaves out a sampler its list does not name; here such a sampler
keeps its place, and runs only if its own field switches it on, as everywhere in steer.

Unsupported samplers. A field steer has no sampler for is ignored, and named in
:attr:`OpenAIRequest.ignored` only when its value is not the neutral one (ST sends all of them, at
their neutral values, on every request). A parameter of such a sampler (``smoothing_curve``,
``dynatemp_low``...) is named only when the sampler itself is switched on. Bookkeeping keys
(``api_type``, ``truncation_length``...) and keys nobody defines are ignored silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steer.errors import InvalidArgumentError
from steer.http.values import (
    MAX_TOKEN_ID,
    _boolean,
    _count,
    _first,
    _number,
    _seed,
    _sequence_breakers,
    _string_list,
    _top_k,
    _whole_context,
)
from steer.json_input import json_type
from steer.limits import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES
from steer.sampling import DEFAULT_ORDER, SamplingConfig

Converter = Callable[[str, Any], Any]

#: SamplingConfig field -> (client names, canonical first; how to read the value)
SAMPLER_FIELDS: dict[str, tuple[tuple[str, ...], Converter]] = {
    "temperature": (("temperature",), _number),
    "temperature_last": (("temperature_last",), _boolean),
    "top_k": (("top_k",), _top_k),
    "top_p": (("top_p",), _number),
    "min_p": (("min_p",), _number),
    "typical_p": (("typical_p", "typical"), _number),
    "tfs": (("tfs", "tfs_z"), _number),
    "top_a": (("top_a",), _number),
    "mirostat_mode": (("mirostat_mode", "mirostat"), _count),
    "mirostat_tau": (("mirostat_tau",), _number),
    "mirostat_eta": (("mirostat_eta",), _number),
    "repetition_penalty": (("repetition_penalty", "rep_pen", "repeat_penalty"), _number),
    "repetition_penalty_range": (
        ("repetition_penalty_range", "rep_pen_range", "repeat_last_n"),
        _whole_context,
    ),
    "presence_penalty": (("presence_penalty",), _number),
    "frequency_penalty": (("frequency_penalty",), _number),
    "dry_multiplier": (("dry_multiplier",), _number),
    "dry_base": (("dry_base",), _number),
    "dry_allowed_length": (("dry_allowed_length",), _count),
    "dry_sequence_breakers": (("dry_sequence_breakers",), _sequence_breakers),
    "dry_range": (("dry_penalty_last_n", "dry_range"), _whole_context),
    "xtc_threshold": (("xtc_threshold",), _number),
    "xtc_probability": (("xtc_probability",), _number),
    "banned_strings": (("banned_strings",), _string_list),
    "ban_eos": (("ignore_eos", "ban_eos_token"), _boolean),
    "min_tokens": (("min_tokens", "min_length"), _count),
    "seed": (("seed", "sampler_seed"), _seed),
}


def sampling_config(body: Mapping[str, Any]) -> SamplingConfig:
    """Every sampler field of ``body`` as one SamplingConfig; errors name the client's key."""
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for name, (aliases, convert) in SAMPLER_FIELDS.items():
        found = _first(body, aliases)
        if found is not None:
            keys[name] = found[0]
            values[name] = convert(*found)
    do_sample = _first(body, ("do_sample",))
    if do_sample is not None and not _boolean(*do_sample):
        # text-generation-webui's do_sample=false is greedy decoding whatever the temperature
        values["temperature"], keys["temperature"] = 0.0, "do_sample"
    bias = _logit_bias(body)
    if bias is not None:
        values["logit_bias"], keys["logit_bias"] = bias
    order = client_order(body)
    if order is not None:
        values["sampler_order"], keys["sampler_order"] = order
    try:
        return SamplingConfig(**values)
    except InvalidArgumentError as error:
        field = keys.get(error.field or "", error.field)
        raise InvalidArgumentError(error.message, field=field) from None


def _logit_bias(body: Mapping[str, Any]) -> tuple[dict[int, float], str] | None:
    """``logit_bias`` merged with ``custom_token_bans`` (bias -inf), and the key to name if
    SamplingConfig refuses the merged result. ``logit_bias`` is OpenAI's object
    ``{"id": bias}`` or llama.cpp's list of pairs ``[[id, bias], [id, false]]`` (false bans the
    token), which SillyTavern sends to llama.cpp and Ollama."""
    bias: dict[int, float] = {}
    key = None
    found = _first(body, ("logit_bias",))
    if found is not None:
        key = "logit_bias"
        if isinstance(found[1], list):
            bias.update(_bias_pairs(key, found[1]))
        elif isinstance(found[1], dict):
            for token, value in found[1].items():
                bias[_token_id(key, token)] = _bias_value(f"{key}.{token}", value)
        else:
            raise InvalidArgumentError(
                f"must be an object {{token_id: bias}} or a list of [token_id, bias] pairs, "
                f"not {json_type(found[1])}",
                field=key,
            )
    bans = _token_bans(body)
    if bans:
        key = key or "custom_token_bans"
        bias.update(dict.fromkeys(bans, -math.inf))
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(
            f"{len(bias)} biased tokens; at most {MAX_LOGIT_BIAS_ENTRIES}", field=key
        )
    return (bias, key) if key is not None else None


def _bias_pairs(key: str, pairs: list[Any]) -> dict[int, float]:
    """llama.cpp's ``[[token_id, bias], ...]``: a bias of ``false`` bans the token. (llama.cpp
    also takes a string for the id, meaning each of its tokens; here ids come from
    ``POST /tokenize``.)"""
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(f"at most {MAX_LOGIT_BIAS_ENTRIES} pairs", field=key)
    bias: dict[int, float] = {}
    for index, pair in enumerate(pairs):
        field = f"{key}[{index}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise InvalidArgumentError("must be a [token_id, bias] pair", field=field)
        token, value = pair
        if isinstance(token, str):
            raise InvalidArgumentError(
                "token ids only: get a text's ids from POST /tokenize", field=f"{field}[0]"
            )
        bias[_token_id(f"{field}[0]", token)] = (
            -math.inf if value is False else _bias_value(f"{field}[1]", value)
        )
    return bias


def _token_id(key: str, value: Any) -> int:
    text = str(value).strip() if isinstance(value, (str, int)) else ""
    if isinstance(value, bool) or not re.fullmatch(r"\d{1,10}", text):
        raise InvalidArgumentError(f"token ids are integers >= 0, got {value!r}", field=key)
    token = int(text)
    if token > MAX_TOKEN_ID:
        raise InvalidArgumentError(f"token id {token} is out of range", field=key)
    return token


def _bias_value(key: str, value: Any) -> float:
    bias = _number(key, value)
    if abs(bias) > MAX_LOGIT_BIAS:
        raise InvalidArgumentError(
            f"must be within [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias:g}", field=key
        )
    return bias


def _token_bans(body: Mapping[str, Any]) -> list[int]:
    """``custom_token_bans``: comma-separated ids (ST's string) or a list of ids (Aphrodite)."""
    key = "custom_token_bans"
    found = _first(body, (key,))
    if found is None:
        return []
    value = found[1]
    if isinstance(value, str):
        if value.count(",") >= MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgumentError(f"at most {MAX_LOGIT_BIAS_ENTRIES} token ids", field=key)
        return [_token_id(key, part) for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise InvalidArgumentError(
            f"must be comma-separated token ids or a list of them, not {json_type(value)}",
            field=key,
        )
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(f"at most {MAX_LOGIT_BIAS_ENTRIES} token ids", field=key)
    return [_token_id(key, token) for token in value]


# -- sampler order -----------------------------------------------------------------------------

#: KoboldCpp's sampler_order integers -> steer processors (KoboldCpp applies min_p in its top_p
#: step and the presence penalty in its repetition penalty step)
KOBOLDCPP_SAMPLERS: dict[int, tuple[str, ...]] = {
    0: ("top_k",),
    1: ("top_a",),
    2: ("top_p", "min_p"),
    3: ("tfs",),
    4: ("typical_p",),
    5: ("temperature",),
    6: ("repetition_penalty", "presence_penalty", "frequency_penalty"),
}
_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
#: sampler_priority and ``samplers`` names (text-generation-webui, Aphrodite, llama.cpp, steer's
#: own) -> steer processors; () = a sampler steer does not have, or Mirostat, which replaces the
#: truncation samplers wherever it is listed
PRIORITY_NAMES: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in DEFAULT_ORDER},
    "penalties": _PENALTIES,
    "top_p_top_k": ("top_k", "top_p"),
    "typ_p": ("typical_p",),
    "tfs_z": ("tfs",),
    "mirostat": (),
    **dict.fromkeys(
        (
            "dynamic_temperature",
            "quadratic_sampling",
            "quadratic",
            "top_n_sigma",
            "top_nsigma",
            "epsilon_cutoff",
            "eta_cutoff",
            "encoder_repetition_penalty",
            "no_repeat_ngram",
            "adaptive_p",
        ),
        (),
    ),
}


def client_order(body: Mapping[str, Any]) -> tuple[tuple[str, ...] | None, str] | None:
    """The full processor order ``sampler_priority`` or ``sampler_order`` asks for (None when
    it is steer's default), with the key it came from; None when neither is present."""
    found = _first(body, ("sampler_priority", "sampler_order", "samplers"))
    if found is None:
        return None
    key, value = found
    if isinstance(value, str):
        value = [part.strip() for part in re.split(r"[,\n]", value) if part.strip()]
    if not isinstance(value, list):
        raise InvalidArgumentError(f"must be a list, not {json_type(value)}", field=key)
    named: list[str] = []
    for index, item in enumerate(value):
        named.extend(_order_entry(item, f"{key}[{index}]"))
    if len(set(named)) != len(named):
        raise InvalidArgumentError(f"names a sampler twice: {value!r}", field=key)
    order = full_order(named)
    return (None if order == DEFAULT_ORDER else order), key


def _order_entry(item: Any, field: str) -> tuple[str, ...]:
    if isinstance(item, str):
        return PRIORITY_NAMES.get(item.strip().lower(), ())
    if isinstance(item, bool) or not isinstance(item, int) or item not in KOBOLDCPP_SAMPLERS:
        raise InvalidArgumentError(
            f"must be a sampler name or a KoboldCpp sampler number 0-6, got {item!r}", field=field
        )
    return KOBOLDCPP_SAMPLERS[item]


def full_order(ordered: Sequence[str]) -> tuple[str, ...]:
    """``DEFAULT_ORDER`` with the processors in ``ordered`` (distinct names from it) moved into
    the places they hold there, in ``ordered``'s order; the others keep their places."""
    places = sorted(DEFAULT_ORDER.index(name) for name in ordered)
    order = list(DEFAULT_ORDER)
    for place, name in zip(places, ordered, strict=True):
        order[place] = name
    return tuple(order)


# -- samplers steer does not have ----------------------------------------------------------------


def _off(value: Any) -> bool:
    """Neutral for a switch: false, 0, a non-positive number, an empty string or object."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value <= 0
    return value in ("", {}, [])


def _equals(neutral: float) -> Callable[[Any], bool]:
    return lambda value: not isinstance(value, bool) and value == neutral


def _at_most(limit: float) -> Callable[[Any], bool]:
    def neutral(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value <= limit

    return neutral


def _negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0


#: unsupported sampler (or output) fields -> whether a value is neutral (has no effect)
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(
        (
            "nsigma",
            "top_n_sigma",
            "smoothing_factor",
            "dynamic_temperature",
            "dynatemp",
            "dynatemp_mode",
            "epsilon_cutoff",
            "eta_cutoff",
            "no_repeat_ngram_size",
            "penalty_alpha",
            "repetition_decay",
            "max_tokens_second",
            "negative_prompt",
            "grammar",
            "grammar_string",
            "guided_grammar",
            "json_schema",
            "guided_json",
            "tools",
            "functions",
            "echo",
            "suffix",
            "include_stop_str_in_output",
            # llama.cpp's /completion
            "lora",
            "n_indent",
            "t_max_predict_ms",
            "image_data",
            "post_sampling_probs",
            "response_fields",
            "timings_per_token",
        ),
        _off,
    ),
    "encoder_repetition_penalty": _equals(1),
    "guidance_scale": _equals(1),
    "rep_pen_slope": _equals(1),
    "num_beams": _at_most(1),
    "best_of": _at_most(1),
    "min_keep": _at_most(1),
    "adaptive_target": _negative,
    "skew": _equals(0),
    "dynatemp_range": _equals(0),
    "response_format": lambda value: value in ({}, {"type": "text"}),
}
#: parameters of an unsupported sampler -> the switches that turn it on
PARAMETERS: dict[str, tuple[str, ...]] = {
    "smoothing_curve": ("smoothing_factor",),
    "adaptive_decay": ("adaptive_target",),
    "length_penalty": ("num_beams",),
    "grammar_retain_state": ("grammar",),
    **dict.fromkeys(
        (
            "dynatemp_low",
            "dynatemp_high",
            "dynatemp_min",
            "dynatemp_max",
            "dynatemp_exponent",
        ),
        ("dynamic_temperature", "dynatemp", "dynatemp_range", "dynatemp_mode"),
    ),
}


def ignored_fields(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The unsupported fields of ``body`` that would change the result elsewhere, sorted."""
    switched_on = {
        key
        for key, neutral in UNSUPPORTED.items()
        if body.get(key) is not None and not neutral(body[key])
    }
    parameters = {
        key
        for key, switches in PARAMETERS.items()
        if body.get(key) is not None and switched_on.intersection(switches)
    }
    return tuple(sorted(switched_on | parameters))
