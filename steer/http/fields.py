"""OpenAI-style request bodies, as SillyTavern and other clients send them, mapped onto steer.

One pure function, :func:`parse_request`, reads the JSON body of ``/v1/completions`` or
``/v1/chat/completions`` in any of the dialects SillyTavern (ST) speaks (OpenAI, TabbyAPI,
KoboldCpp, text-generation-webui, Aphrodite) and returns an :class:`OpenAIRequest`: the prompt or
messages, one :class:`~steer.sampling.SamplingConfig` for steer's one sampler pipeline, and the
steering fields. Nothing here touches a model or the network.

Aliases. Several dialects name one setting differently and ST sends every name at once; the first
name below is canonical and wins when two names are present with different values (``null`` counts
as absent)::

    max_tokens        max_new_tokens, max_completion_tokens, n_predict, num_predict
    typical_p         typical
    tfs               tfs_z
    mirostat_mode     mirostat
    repetition_penalty          rep_pen, repeat_penalty
    repetition_penalty_range    rep_pen_range, repeat_last_n     (-1 or 0 = the whole context)
    dry_penalty_last_n          dry_range                        (-1 or 0 = the whole context)
    min_tokens        min_length
    ignore_eos        ban_eos_token   (Aphrodite honours ignore_eos, and ST sends it from a
                                       different setting there; elsewhere ST sends both equal)
    seed              sampler_seed    (-1 = no seed)
    stop              stopping_strings
    sampler_priority  sampler_order   (names, or KoboldCpp's integers)
    logprobs          n_probs         (completions)

Other readings: ``top_k`` -1 is 0 (off); ``do_sample: false`` (text-generation-webui) is greedy
decoding; ``custom_token_bans`` (comma-separated ids or a list) joins ``logit_bias`` at -inf;
``dry_sequence_breakers`` is a list or a JSON array in a string; ``n_predict`` -1 is the server's
default length. A chat message's content parts are joined by newlines; only text parts are taken.

Sampler order. ``SamplingConfig.sampler_order`` lists the processors that run, so a client's
partial order is completed: the samplers it names take the places those samplers hold in
:data:`~steer.sampling.DEFAULT_ORDER`, in the client's order, and every other sampler stays where it
is. KoboldCpp's integers: 0 top_k, 1 top_a, 2 top_p (with min_p), 3 tfs, 4 typical, 5 temperature,
6 repetition penalty (with presence and frequency penalties); DRY runs first and XTC last as in
KoboldCpp. Names (text-generation-webui, Aphrodite) that steer has no sampler for are skipped,
and so are names nobody defines, so that a front end adding a sampler does not break requests.

Unsupported samplers. A field steer has no sampler for is ignored, and named in
:attr:`OpenAIRequest.ignored` only when its value is not the neutral one (ST sends all of them, at
their neutral values, on every request). A parameter of such a sampler (``smoothing_curve``,
``dynatemp_low``...) is named only when the sampler itself is switched on. Bookkeeping keys
(``api_type``, ``truncation_length``...) and keys nobody defines are ignored silently.

Errors. A bad value raises :class:`~steer.errors.InvalidArgumentError` whose ``field`` is the
JSON key the client sent (``rep_pen``, ``messages[2].role``, ``steer.moralizing``). So does a
string anywhere in the body that is not Unicode text (an escaped unpaired surrogate, ``\\ud800``),
and a count past what the GenerateRequest proto carries (uint32).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from steer.errors import InvalidArgumentError
from steer.json_input import json_type
from steer.limits import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES
from steer.rp.cards import card_from_json
from steer.rp.formats import FORMATS
from steer.rp.scene import Character
from steer.sampling import DEFAULT_ORDER, SamplingConfig

#: prefix of the flat numeric slider fields ("steer.moralizing": -1.0)
SLIDER_PREFIX = "steer."
#: the field naming a steer.rp prompt format for a chat request
PROMPT_FORMAT_FIELD = "steer_prompt_format"
#: the field carrying a character card (Tavern V1/V2 JSON object) for a chat request
CARD_FIELD = "steer_card"
#: most choices (``n``) one request may ask for
MAX_CHOICES = 16
#: most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for (OpenAI's limit)
MAX_LOGPROBS = 20
#: largest integer any integer field accepts (seeds are 64-bit downstream)
_MAX_INTEGER = 2**63 - 1
#: largest count (token counts, windows, top_k, modes: uint32 in the GenerateRequest proto)
_MAX_COUNT = 2**32 - 1
#: largest token id (every vocabulary indexes with int32)
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class ChatTurn:
    """One chat message."""

    #: "system" | "user" | "assistant" (OpenAI's "developer" is read as "system")
    role: str
    #: the text; a list of content parts is read as its text parts joined by newlines
    content: str
    #: the message's ``name``: the speaker in a group chat
    name: str | None = None


@dataclass(frozen=True)
class OpenAIRequest:
    """One parsed request body."""

    #: the ``model`` field, "" if absent
    model: str
    #: ``/v1/completions``: the prompt text
    prompt: str | None
    #: ``/v1/chat/completions``: the messages
    messages: tuple[ChatTurn, ...] | None
    #: every sampler field mapped onto steer's pipeline, the seed included
    sampling: SamplingConfig
    #: most tokens to generate; None = the server's default
    max_new_tokens: int | None
    #: stop strings, deduplicated, in the order given
    stop: tuple[str, ...]
    #: how many choices (rows of one batch)
    n: int
    stream: bool
    #: ``stream_options.include_usage``: usage in the last streamed chunk
    include_usage: bool
    #: alternatives reported per generated token (0 = no logprobs)
    logprobs: int
    #: flat slider fields, "steer.NAME": value, keyed by NAME
    sliders: Mapping[str, float]
    #: the nested ``steering`` list, each entry a JSON object passed through
    steering: tuple[Mapping[str, Any], ...]
    #: a steer.rp prompt format name (``steer_prompt_format``), or None
    prompt_format: str | None
    #: the character card (``steer_card``), checked; the reply is in its character's voice
    card: Character | None
    #: unsupported sampler fields present with a value that is not neutral, sorted
    ignored: tuple[str, ...]


def parse_request(body: Any, *, chat: bool) -> OpenAIRequest:
    """The request ``body`` (parsed JSON) of a chat (``chat``) or text completion."""
    if not isinstance(body, dict):
        raise InvalidArgumentError(
            f"the request body must be a JSON object, not {json_type(body)}", field="body"
        )
    check_unicode(body)
    prompt, messages = _prompt_and_messages(body, chat)
    model = _first(body, ("model",))
    if model is not None and not isinstance(model[1], str):
        raise InvalidArgumentError("must be a string", field="model")
    return OpenAIRequest(
        model=model[1] if model else "",
        prompt=prompt,
        messages=messages,
        sampling=sampling_config(body),
        max_new_tokens=_max_new_tokens(body),
        stop=_strings(body, ("stop", "stopping_strings")),
        n=_bounded(body, "n", 1, 1, MAX_CHOICES),
        stream=_flag(body, "stream"),
        include_usage=_include_usage(body),
        logprobs=_logprobs(body, chat),
        sliders=_sliders(body),
        steering=_steering(body),
        prompt_format=_prompt_format(body),
        card=_card(body, chat),
        ignored=ignored_fields(body),
    )


def check_unicode(body: Mapping[str, Any]) -> None:
    """Refuse a body with a string (or key) that is not Unicode text: JSON's ``\\ud800`` escape
    of an unpaired surrogate parses, but no tokenizer, protobuf or UTF-8 encoder takes it."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            _encodable(value, path or "body")
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                name = _printable(key)
                child = f"{path}.{name}" if path else name
                _encodable(key, child)
                pending.append((child, item))


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = _printable(text[error.start : error.end])
        raise InvalidArgumentError(
            f"is not Unicode text: an unpaired surrogate ({bad}) at character {error.start}",
            field=field,
        ) from None


# -- prompt and messages ---------------------------------------------------------------------


def _prompt_and_messages(
    body: Mapping[str, Any], chat: bool
) -> tuple[str | None, tuple[ChatTurn, ...] | None]:
    wanted, other = ("messages", "prompt") if chat else ("prompt", "messages")
    if body.get(other) is not None:
        raise InvalidArgumentError(
            f"a {'chat' if chat else 'text'} completion takes {wanted!r}, not {other!r}",
            field=other,
        )
    if body.get(wanted) is None:
        raise InvalidArgumentError("is required", field=wanted)
    if chat:
        return None, _messages(body["messages"])
    return _prompt(body["prompt"]), None


def _prompt(value: Any) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise InvalidArgumentError(
                f"a list of {len(value)} prompts; this server takes exactly one", field="prompt"
            )
        value = value[0]
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"must be a string (or a list of one string), not {json_type(value)}", field="prompt"
        )
    return value


def _messages(value: Any) -> tuple[ChatTurn, ...]:
    if not isinstance(value, list):
        raise InvalidArgumentError(f"must be a list, not {json_type(value)}", field="messages")
    if not value:
        raise InvalidArgumentError("must not be empty", field="messages")
    return tuple(_turn(message, f"messages[{index}]") for index, message in enumerate(value))


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _turn(message: Any, field: str) -> ChatTurn:
    if not isinstance(message, dict):
        raise InvalidArgumentError(f"must be an object, not {json_type(message)}", field=field)
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls"):
        raise InvalidArgumentError(
            "tool and function calls are not supported", field=f"{field}.role"
        )
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidArgumentError(
            f"must be one of {sorted(_ROLES)}, got {role!r}", field=f"{field}.role"
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError("must be a string", field=f"{field}.name")
    content = _content(message.get("content"), f"{field}.content")
    return ChatTurn(role=_ROLES[role], content=content, name=name or None)


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidArgumentError(
            f"must be a string or a list of content parts, not {json_type(value)}", field=field
        )
    texts = []
    for index, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidArgumentError("only text parts are supported", field=f"{field}[{index}]")
        if not isinstance(part.get("text"), str):
            raise InvalidArgumentError("must be a string", field=f"{field}[{index}].text")
        texts.append(part["text"])
    return "\n".join(texts)


# -- scalar readers --------------------------------------------------------------------------


def _first(body: Mapping[str, Any], names: Iterable[str]) -> tuple[str, Any] | None:
    """The first of ``names`` (canonical first) present and not null, with its value."""
    for name in names:
        value = body.get(name)
        if value is not None:
            return name, value
    return None


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"must be a number, not {json_type(value)}", field=key)
    try:
        number = float(value)
    except OverflowError:
        raise InvalidArgumentError("is too large", field=key) from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"must be finite, got {value!r}", field=key)
    return number


def _integer(key: str, value: Any) -> int:
    """An integer; a float with an integral value is accepted (some clients send ``40.0``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"must be an integer, got {value!r}", field=key)
    if abs(value) > _MAX_INTEGER:
        raise InvalidArgumentError("is too large", field=key)
    return value


def _count(key: str, value: Any) -> int:
    """An integer that travels as a uint32 (negative ones are SamplingConfig's to refuse)."""
    count = _integer(key, value)
    if count > _MAX_COUNT:
        raise InvalidArgumentError(f"is too large: at most {_MAX_COUNT}, got {count}", field=key)
    return count


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"must be true or false, got {value!r}", field=key)
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    found = _first(body, (key,))
    return _boolean(key, found[1]) if found else False


def _bounded(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    found = _first(body, (key,))
    if found is None:
        return default
    value = _integer(key, found[1])
    if not low <= value <= high:
        raise InvalidArgumentError(f"must be in [{low}, {high}], got {value}", field=key)
    return value


def _whole_context(key: str, value: Any) -> int:
    """A token window where -1 (llama.cpp) and 0 (text-generation-webui) mean everything."""
    window = _count(key, value)
    if window < -1:
        raise InvalidArgumentError(f"must be -1, 0 or a token count, got {window}", field=key)
    return max(window, 0)


def _top_k(key: str, value: Any) -> int:
    top_k = _count(key, value)
    return 0 if top_k == -1 else top_k


def _seed(key: str, value: Any) -> int | None:
    seed = _integer(key, value)
    return None if seed == -1 else seed


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings; empty strings dropped, duplicates dropped."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidArgumentError(f"must be a list of strings, not {json_type(value)}", field=key)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidArgumentError(
                f"must be a string, not {json_type(item)}", field=f"{key}[{index}]"
            )
    return tuple(dict.fromkeys(item for item in items if item))


def _sequence_breakers(key: str, value: Any) -> tuple[str, ...]:
    """DRY breakers: a list, or text as ST and text-generation-webui send it (a JSON array,
    JSON strings without the brackets, or failing both, comma-separated as ST splits it)."""
    if not isinstance(value, str):
        return _string_list(key, value)
    text = value.strip()
    bracketed = text.startswith("[")
    try:
        parsed = json.loads(text if bracketed else f"[{text}]")
    except (ValueError, RecursionError):
        if bracketed:
            raise InvalidArgumentError("must be a JSON array of strings", field=key) from None
        return tuple(dict.fromkeys(part for part in text.split(",") if part))
    if not all(isinstance(item, str) for item in parsed):
        raise InvalidArgumentError("must be a JSON array of strings", field=key)
    for index, item in enumerate(parsed):
        _encodable(item, f"{key}[{index}]")  # JSON inside the string: not checked with the body
    return tuple(dict.fromkeys(item for item in parsed if item))


def _strings(body: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    found = _first(body, names)
    return _string_list(*found) if found else ()


# -- sampling ----------------------------------------------------------------------------------

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
    """``logit_bias`` ({"id": bias}) merged with ``custom_token_bans`` (bias -inf), and the
    key to name if SamplingConfig refuses the merged result."""
    bias: dict[int, float] = {}
    key = None
    found = _first(body, ("logit_bias",))
    if found is not None:
        key = "logit_bias"
        if not isinstance(found[1], dict):
            raise InvalidArgumentError(
                f"must be an object {{token_id: bias}}, not {json_type(found[1])}", field=key
            )
        for token, value in found[1].items():
            bias[_token_id(key, token)] = _bias_value(f"{key}.{token}", value)
    bans = _token_bans(body)
    if bans:
        key = key or "custom_token_bans"
        bias.update(dict.fromkeys(bans, -math.inf))
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidArgumentError(
            f"{len(bias)} biased tokens; at most {MAX_LOGIT_BIAS_ENTRIES}", field=key
        )
    return (bias, key) if key is not None else None


def _token_id(key: str, value: Any) -> int:
    text = str(value).strip() if isinstance(value, (str, int)) else ""
    if isinstance(value, bool) or not re.fullmatch(r"\d{1,10}", text):
        raise InvalidArgumentError(f"token ids are integers >= 0, got {value!r}", field=key)
    token = int(text)
    if token > _MAX_TOKEN_ID:
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
#: sampler_priority names (text-generation-webui, Aphrodite, llama.cpp, steer's own) -> steer
#: processors; () = a sampler steer does not have, or Mirostat, which replaces the truncation
#: samplers wherever it is listed
PRIORITY_NAMES: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in DEFAULT_ORDER},
    "penalties": _PENALTIES,
    "top_p_top_k": ("top_k", "top_p"),
    "typ_p": ("typical_p",),
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
    found = _first(body, ("sampler_priority", "sampler_order"))
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


# -- the rest ---------------------------------------------------------------------------------


def _max_new_tokens(body: Mapping[str, Any]) -> int | None:
    found = _first(
        body, ("max_tokens", "max_new_tokens", "max_completion_tokens", "n_predict", "num_predict")
    )
    if found is None:
        return None
    key, value = found
    tokens = _count(key, value)
    if tokens == -1 and key in ("n_predict", "num_predict"):
        return None  # llama.cpp's "until the end of the sequence"
    if tokens < 1:
        raise InvalidArgumentError(f"must be at least 1, got {tokens}", field=key)
    return tokens


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidArgumentError(
            f"must be an object, not {json_type(options)}", field="stream_options"
        )
    usage = options.get("include_usage")
    return False if usage is None else _boolean("stream_options.include_usage", usage)


def _logprobs(body: Mapping[str, Any], chat: bool) -> int:
    """Completions: ``logprobs`` is a count. Chat: ``logprobs: true`` with ``top_logprobs``
    (true alone = 1); a count in ``logprobs`` is accepted too, as ST's text types send it."""
    found = _first(body, ("logprobs",) if chat else ("logprobs", "n_probs"))
    if found is None or found[1] is False:
        return 0
    key, value = found
    if chat and value is True:
        top = _first(body, ("top_logprobs",))
        key, value = top if top is not None else ("logprobs", 1)
    count = _integer(key, value)
    if not 0 <= count <= MAX_LOGPROBS:
        raise InvalidArgumentError(f"must be in [0, {MAX_LOGPROBS}], got {count}", field=key)
    return count


def _sliders(body: Mapping[str, Any]) -> Mapping[str, float]:
    sliders = {}
    for key, value in body.items():
        if not key.startswith(SLIDER_PREFIX):
            continue
        if key == SLIDER_PREFIX:
            raise InvalidArgumentError("a slider field needs a name after 'steer.'", field=key)
        sliders[key[len(SLIDER_PREFIX) :]] = _number(key, value)
    return MappingProxyType(sliders)


def _steering(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    value = body.get("steering")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidArgumentError(
            f"must be a list of objects, not {json_type(value)}", field="steering"
        )
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise InvalidArgumentError(
                f"must be an object, not {json_type(entry)}", field=f"steering[{index}]"
            )
    return tuple(dict(entry) for entry in value)


def _card(body: Mapping[str, Any], chat: bool) -> Character | None:
    value = body.get(CARD_FIELD)
    if value is None:
        return None
    if not chat:
        raise InvalidArgumentError(
            "a character card needs chat messages: use /v1/chat/completions", field=CARD_FIELD
        )
    try:
        return card_from_json(value)
    except InvalidArgumentError as error:
        key = (error.field or "").removeprefix("card").lstrip(".")
        error.field = f"{CARD_FIELD}.{key}" if key else CARD_FIELD
        raise


def _prompt_format(body: Mapping[str, Any]) -> str | None:
    value = body.get(PROMPT_FORMAT_FIELD)
    if value is None:
        return None
    if not isinstance(value, str) or value not in FORMATS:
        raise InvalidArgumentError(
            f"unknown prompt format {value!r}; choose from {sorted(FORMATS)}",
            field=PROMPT_FORMAT_FIELD,
        )
    return value
