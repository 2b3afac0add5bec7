"""Tokenizer and current-model routes in the words of each server SillyTavern connects to.

SillyTavern's Text Completion types ask their backend for these, so its token counts (context
trimming, the prompt's token bar) and token-id features (logit bias, banned tokens) use the served
model's own tokenizer instead of a guess.

SillyTavern's "Best match" tokenizer asks the backend it is connected to, each in its own words:

=============================  ==============================  ==================================
route                          body                            reply
=============================  ==============================  ==================================
``POST /v1/token/encode``      TabbyAPI: ``text``              ``tokens``, ``length``
``POST /v1/internal/encode``   text-generation-webui: ``text`` ``tokens``, ``length``
``POST /api/extra/tokencount`` KoboldCpp: ``prompt``           ``value``, ``ids``
``POST /tokenize``             llama.cpp: ``content``;         ``tokens``, ``count``
                               vLLM: ``prompt`` (+ ``model``)
``POST /v1/tokenize``          Aphrodite: ``prompt``           ``tokens``, ``count``
=============================  ==============================  ==================================

and the matching decoders (``/v1/token/decode``, ``/v1/internal/decode``,
``/api/extra/detokenize``, ``/detokenize``) take ``tokens`` (KoboldCpp: ``ids``). Every encoder is
:func:`steer.text.encode_text`, what ``POST /v1/completions`` does with its ``prompt``: a count
equals that completion's ``usage.prompt_tokens`` (test). The special-token flags each server has
keep their meaning and default (TabbyAPI ``add_bos_token``, true; llama.cpp ``add_special``,
false; vLLM ``add_special_tokens``, true); llama.cpp's ``with_pieces`` gives each token's piece
(its text, or its bytes when it holds part of a character). ``model`` picks a loaded model;
without it, the server's default. ``GET /v1/model`` (TabbyAPI) and ``GET
/v1/internal/model/info`` (text-generation-webui) name the default model, which is what
SillyTavern shows as connected.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request

from steer.errors import InvalidArgumentError
from steer.http.values import check_unicode
from steer.limits import check_text_size
from steer.models import ModelHandle
from steer.service.core import ServiceCore
from steer.text import encode_prompt, encode_text

BodyReader = Callable[[ServiceCore, Request], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class _Text:
    """Where one server's encode request keeps its text and special-token flag."""

    key: str
    special: str | None = None
    special_default: bool = True


@dataclass(frozen=True)
class _Route:
    path: str
    texts: tuple[_Text, ...]  # the first whose key the body has (llama.cpp and vLLM share a path)
    reply: Callable[[list[int]], dict[str, Any]]


def _tokens_length(ids: list[int]) -> dict[str, Any]:
    return {"tokens": ids, "length": len(ids)}


def _tokens_count(ids: list[int]) -> dict[str, Any]:
    return {"tokens": ids, "count": len(ids)}


ENCODERS = (
    _Route("/v1/token/encode", (_Text("text", "add_bos_token"),), _tokens_length),
    _Route("/v1/internal/encode", (_Text("text"),), _tokens_length),
    _Route(
        "/api/extra/tokencount", (_Text("prompt"),), lambda ids: {"value": len(ids), "ids": ids}
    ),
    _Route(
        "/tokenize",
        (_Text("content", "add_special", False), _Text("prompt", "add_special_tokens")),
        _tokens_count,
    ),
    _Route("/v1/tokenize", (_Text("prompt", "add_special_tokens"),), _tokens_count),
)

#: path -> (the key of its token ids, its reply to the decoded text)
DECODERS: Mapping[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "/v1/token/decode": ("tokens", lambda text: {"text": text}),
    "/v1/internal/decode": ("tokens", lambda text: {"text": text}),
    "/api/extra/detokenize": ("ids", lambda text: {"result": text, "success": True}),
    "/detokenize": ("tokens", lambda text: {"content": text, "prompt": text}),
}


#: path -> the reply naming the loaded model, as TabbyAPI and text-generation-webui answer (the
#: Ray Serve router answers them for the whole app with the same replies)
CURRENT_MODEL: Mapping[str, Callable[[str], dict[str, Any]]] = {
    "/v1/model": lambda name: {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "steer",
    },
    "/v1/internal/model/info": lambda name: {"model_name": name, "lora_names": []},
}


def add_token_routes(app: FastAPI, core: ServiceCore, read_body: BodyReader) -> None:
    """Register the routes above on ``app``; ``read_body`` is the API's one body reader (its
    size limit and JSON checks)."""
    for route in ENCODERS:
        endpoint = _encoder(core, read_body, route)
        app.add_api_route(route.path, endpoint, methods=["POST"], name=f"encode {route.path}")
    for path, (key, reply) in DECODERS.items():
        endpoint = _decoder(core, read_body, key, reply)
        app.add_api_route(path, endpoint, methods=["POST"], name=f"decode {path}")

    for path, reply in CURRENT_MODEL.items():
        app.add_api_route(path, _current(core, reply), methods=["GET"], name=f"model {path}")


def _current(
    core: ServiceCore, reply: Callable[[str], dict[str, Any]]
) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def current() -> dict[str, Any]:
        return reply(core.registry.get("").model_id)

    return current


def _encoder(
    core: ServiceCore, read_body: BodyReader, route: _Route
) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    async def encode(request: Request) -> dict[str, Any]:
        body = await _read(core, read_body, request)
        handle = _handle(core, body)
        text, special = _text_of(body, route.texts, core.settings.max_prompt_tokens)
        ids = await asyncio.to_thread(_tokenize, handle, text, special)
        reply = route.reply(ids)
        if route.path == "/tokenize" and _with_pieces(body):  # decoded off the event loop too
            reply["tokens"] = await asyncio.to_thread(_pieces, handle.tokenizer, ids)
        return reply

    return encode


def _decoder(
    core: ServiceCore,
    read_body: BodyReader,
    key: str,
    reply: Callable[[str], dict[str, Any]],
) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    async def decode(request: Request) -> dict[str, Any]:
        body = await _read(core, read_body, request)
        handle = _handle(core, body)
        ids = _token_ids(handle, core, body.get(key), key)
        text = await asyncio.to_thread(handle.tokenizer.decode, ids)
        return reply(str(text))

    return decode


async def _read(core: ServiceCore, read_body: BodyReader, request: Request) -> dict[str, Any]:
    body = await read_body(core, request)
    check_unicode(body)  # a lone surrogate reaches no tokenizer
    return body


def _tokenize(handle: ModelHandle, text: str, special: bool) -> list[int]:
    """``text``'s token ids: with the special tokens, exactly what the completion path
    encodes for it as a prompt; without them, the text's own tokens."""
    if not special:
        return list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])
    return encode_text(handle.tokenizer, text)


def _with_pieces(body: Mapping[str, Any]) -> bool:
    """llama.cpp's ``with_pieces`` (default false)."""
    flag = body.get("with_pieces")
    if flag is not None and not isinstance(flag, bool):
        raise InvalidArgumentError("expected true or false", field="with_pieces")
    return bool(flag)


def _pieces(tokenizer: Any, ids: list[int]) -> list[dict[str, Any]]:
    return [{"id": token, "piece": token_piece(tokenizer, token)} for token in ids]


def token_piece(tokenizer: Any, token_id: int) -> str | list[int]:
    """One token's text as llama.cpp's ``/tokenize`` gives it with ``with_pieces``: a string,
    or the token's bytes when they are not whole UTF-8 characters (part of a character split
    across tokens)."""
    text = str(tokenizer.decode([token_id]))
    if "\ufffd" not in text:
        return text
    raw = _raw_bytes(str(tokenizer.convert_ids_to_tokens(token_id)))
    return list(raw) if raw is not None else text


def _raw_bytes(token: str) -> bytes | None:
    """A token's bytes from its vocabulary entry: SentencePiece's byte tokens (``<0xE2>``) and
    byte-level BPE's printable stand-ins for bytes (GPT-2's table); None for anything else."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    table = _byte_level_table()
    if token and all(char in table for char in token):
        return bytes(table[char] for char in token)
    return None


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's stand-in character -> byte: printable Latin-1 bytes stand for
    themselves, and the other bytes, in order, for the characters from U+0100 on."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in kept]
    table = {chr(byte): byte for byte in kept}
    table.update({chr(0x100 + index): byte for index, byte in enumerate(others)})
    return table


def _handle(core: ServiceCore, body: Mapping[str, Any]) -> ModelHandle:
    model = body.get("model", "")
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise InvalidArgumentError("expected a model name (a string)", field="model")
    return core.registry.get(model).handle


def _text_of(body: Mapping[str, Any], texts: Sequence[_Text], max_tokens: int) -> tuple[str, bool]:
    """The text to encode (refused by its length past ``max_tokens``, as a prompt is) and
    whether to add the tokenizer's special tokens."""
    form = next((t for t in texts if t.key in body), None)
    if form is None:
        names = " or ".join(repr(t.key) for t in texts)
        raise InvalidArgumentError(f"expected the text to encode as {names}", field=texts[0].key)
    text = body[form.key]
    if not isinstance(text, str):
        raise InvalidArgumentError("expected a string", field=form.key)
    check_text_size(len(text), max_tokens, form.key)
    special = form.special_default
    if form.special is not None and body.get(form.special) is not None:
        flag = body[form.special]
        if not isinstance(flag, bool):
            raise InvalidArgumentError("expected true or false", field=form.special)
        special = flag
    return text, special


def _token_ids(handle: ModelHandle, core: ServiceCore, value: Any, key: str) -> list[int]:
    """``value`` as token ids of ``handle``'s vocabulary, at most as many as the longest
    sequence the server handles (the prompt limit and the reply cap)."""
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise InvalidArgumentError("expected a list of token ids (integers)", field=key)
    limit = core.settings.max_prompt_tokens + core.settings.max_new_tokens_cap
    if len(value) > limit:
        raise InvalidArgumentError(f"{len(value)} token ids; at most {limit}", field=key)
    if not value:
        return []
    try:
        return encode_prompt(handle, prompt_ids=value)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(error.message, field=key) from None
