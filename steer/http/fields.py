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

Errors. A bad value raises :class:`~steer.errors.InvalidArgumentError` whose ``field`` is the
JSON key the client sent (``rep_pen``, ``messages[2].role``, ``steer.moralizing``). So does a
string anywhere in the body that is not Unicode text (an escaped unpaired surrogate, ``\\ud800``),
and a count past what the GenerateRequest proto carries (uint32).

How samplers are read, their order and the samplers steer does not have:
:mod:`steer.http.samplers`; how each JSON value is read: :mod:`steer.http.values`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from steer.errors import InvalidArgumentError
from steer.http.samplers import (
    PARAMETERS,
    PRIORITY_NAMES,
    SAMPLER_FIELDS,
    UNSUPPORTED,
    client_order,
    full_order,
    ignored_fields,
    sampling_config,
)
from steer.http.values import (
    MAX_TOKEN_ID,
    _boolean,
    _bounded,
    _count,
    _first,
    _flag,
    _integer,
    _number,
    _strings,
    check_unicode,
)
from steer.json_input import json_type
from steer.limits import MAX_TOP_LOGPROBS
from steer.rp.cards import card_from_json
from steer.rp.formats import FORMATS
from steer.rp.scene import Character
from steer.sampling import SamplingConfig

# the sampler tables and readers live in steer.http.samplers; their names import from here too
__all__ = [
    "CARD_FIELD",
    "MAX_CHOICES",
    "MAX_LOGPROBS",
    "PARAMETERS",
    "PRIORITY_NAMES",
    "PROMPT_FORMAT_FIELD",
    "SAMPLER_FIELDS",
    "SLIDER_PREFIX",
    "UNSUPPORTED",
    "ChatTurn",
    "OpenAIRequest",
    "check_unicode",
    "client_order",
    "full_order",
    "ignored_fields",
    "parse_request",
    "sampling_config",
]

#: prefix of the flat numeric slider fields ("steer.moralizing": -1.0)
SLIDER_PREFIX = "steer."
#: the field naming a steer.rp prompt format for a chat request
PROMPT_FORMAT_FIELD = "steer_prompt_format"
#: the field carrying a character card (Tavern V1/V2 JSON object) for a chat request
CARD_FIELD = "steer_card"
#: most choices (``n``) one request may ask for
MAX_CHOICES = 16
#: most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for (the engine's limit,
#: checked here to name the key the client sent)
MAX_LOGPROBS = MAX_TOP_LOGPROBS


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
    #: ``/v1/completions``: the prompt text (None when the prompt is token ids)
    prompt: str | None
    #: ``/v1/completions``: the prompt as token ids (a list of integers), or None
    prompt_ids: tuple[int, ...] | None
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
    prompt_ids = prompt if isinstance(prompt, tuple) else None
    model = _first(body, ("model",))
    if model is not None and not isinstance(model[1], str):
        raise InvalidArgumentError("must be a string", field="model")
    return OpenAIRequest(
        model=model[1] if model else "",
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_ids=prompt_ids,
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


# -- prompt and messages ---------------------------------------------------------------------


def _prompt_and_messages(
    body: Mapping[str, Any], chat: bool
) -> tuple[str | tuple[int, ...] | None, tuple[ChatTurn, ...] | None]:
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


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string, or token ids (a list of integers), or a list holding one of those."""
    if isinstance(value, list) and _is_token_ids(value):
        return tuple(value)
    if isinstance(value, list):
        if any(type(item) is int for item in value):
            raise InvalidArgumentError(
                "token ids mixed with text; send text, or token ids only", field="prompt"
            )
        if len(value) != 1:
            raise InvalidArgumentError(
                f"a list of {len(value)} prompts; this server takes exactly one", field="prompt"
            )
        value = value[0]
        if isinstance(value, list) and _is_token_ids(value):
            return tuple(value)
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"must be a string or token ids (or a list of one of them), not {json_type(value)}",
            field="prompt",
        )
    return value


def _is_token_ids(value: list[Any]) -> bool:
    """A non-empty list of integers (OpenAI's and llama.cpp's token-id prompt). Each id is
    checked against the model's vocabulary where the prompt is encoded."""
    if not value or not all(type(item) is int for item in value):
        return False
    for index, token in enumerate(value):
        if not 0 <= token <= MAX_TOKEN_ID:
            raise InvalidArgumentError(
                f"token ids are integers >= 0, got {token}", field=f"prompt[{index}]"
            )
    return True


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
