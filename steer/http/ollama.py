"""Ollama's routes: ``POST /api/generate``, ``POST /api/chat`` and ``GET /api/tags``.

SillyTavern's "Ollama" Text Completion type lists models with ``GET /api/tags`` and posts
``{"model", "prompt", "stream", "raw": true, "keep_alive", "options": {...}}`` to
``/api/generate``, reading ``response`` of each newline-delimited JSON line (or of the one body).
Ollama keeps its samplers in ``options`` under llama.cpp's names (``num_predict``,
``repeat_penalty``, ``repeat_last_n``, ``tfs_z``, ``mirostat``, ``stop``, ``seed``...);
:func:`read_request` lifts them to the top level and reads the body with
:func:`steer.http.fields.parse_request`, so every sampler, slider (``steer.NAME``, at the top level
or in ``options``) and ``steering`` list means what it means on ``/v1/completions``.

Ollama's own rules kept here: ``stream`` is true unless the body says false; ``raw: true`` sends
the prompt as it is, otherwise the prompt is one user message (after ``system``, if given) in the
model's chat template, as Ollama's default template does; a body with no prompt loads the model
and answers ``done_reason: "load"``; ``num_predict`` -1 and -2 are the server's default length.
``/api/chat`` (what Ollama's other clients use) takes ``messages`` instead of a prompt, read as
``/v1/chat/completions`` reads them (an empty list is the load call), and answers
``{"message": {"role": "assistant", "content"}}`` where ``/api/generate`` answers ``response``.

The reply: each line ``{"model", "created_at", "response", "done": false}``, then a last line with
``"done": true``, ``done_reason`` (``stop`` or ``length``) and Ollama's counts and durations
(nanoseconds, measured by the server: ``prompt_eval_duration`` is queue and prompt time to the first
token). Without streaming, the same last object with the whole ``response``. An error after the
first byte is a line ``{"error": "..."}``, as Ollama sends. Ollama features steer lacks (``format``,
``images``, ``context``, ``template``, ``suffix``, ``think``, ``logprobs``, ``tools``) are ignored
and named in the ``X-Steer-Ignored-Fields`` header when set.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from steer.errors import InvalidArgumentError
from steer.http.answers import Answer, Timer, error_body
from steer.http.fields import OpenAIRequest, parse_request
from steer.http.values import _boolean
from steer.json_input import json_type
from steer.models import ModelHandle
from steer.requests import GenerationEvent
from steer.service.scheduler import Subscription

GENERATE = "/api/generate"
CHAT = "/api/chat"
TAGS = "/api/tags"
#: top-level keys of an Ollama body that are not samplers (samplers live in ``options``)
_TOP_LEVEL = ("model", "prompt", "messages", "stream", "system")
#: Ollama features steer does not have: named ignored when set to anything but their neutral value
_UNSUPPORTED = ("format", "images", "context", "template", "suffix", "think", "logprobs", "tools")
_DONE_REASON = {"stop": "stop", "length": "length", "cancelled": "stop"}


def tags_body(model_ids: Iterable[str]) -> dict[str, Any]:
    """``GET /api/tags``: the loaded models as Ollama lists them (SillyTavern reads ``name``)."""
    return {
        "models": [
            {
                "name": model_id,
                "model": model_id,
                "modified_at": _now(),
                "size": 0,
                "digest": "",
                "details": {"format": "safetensors"},
            }
            for model_id in model_ids
        ]
    }


@dataclass(frozen=True)
class Reply:
    """How one ``/api/generate`` request is answered."""

    #: the ``model`` field ("" = the server's default)
    model: str
    #: ``/api/chat`` (replies carry ``message``) rather than ``/api/generate`` (``response``)
    chat: bool = False

    def answer(self, parsed: OpenAIRequest, model: str, handle: ModelHandle) -> Answer:
        return OllamaAnswer(parsed, model, chat=self.chat)

    def loaded(self, model: str) -> dict[str, Any]:
        """The reply to a body with no prompt: Ollama's "load the model" call."""
        body = {"model": model, "created_at": _now(), **_text("", self.chat)}
        return {**body, "done": True, "done_reason": "load"}


def read_request(body: Any, *, chat: bool = False) -> tuple[OpenAIRequest | None, Reply]:
    """An ``/api/generate`` (``/api/chat`` when ``chat``) body as one completion; None when it
    has no prompt (no messages): Ollama's load call."""
    if not isinstance(body, dict):
        raise InvalidArgumentError(
            f"the request body must be a JSON object, not {json_type(body)}", field="body"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgumentError("must be a string", field="model")
    reply = Reply(model=model or "", chat=chat)
    if body.get("messages" if chat else "prompt") in (None, "", []):
        return None, reply
    flat = _flattened(body, chat)
    if not chat and not (_boolean("raw", body["raw"]) if body.get("raw") is not None else False):
        flat["messages"] = [{"role": "user", "content": flat.pop("prompt")}]
        system = flat.pop("system", None)
        if system is not None:
            flat["messages"].insert(0, {"role": "system", "content": system})
    parsed = parse_request(flat, chat="messages" in flat)
    ignored = {key for key in _UNSUPPORTED if body.get(key) not in (None, False, "", [], {})}
    if chat and any(isinstance(m, dict) and m.get("images") for m in body["messages"]):
        ignored.add("images")  # a chat message's pictures: steer serves text models
    if ignored:
        parsed = replace(parsed, ignored=tuple(sorted({*parsed.ignored, *ignored})))
    return parsed, reply


def _flattened(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """The body with ``options`` lifted to the top level, where steer's parser reads samplers;
    steer's own fields (``steer.NAME``, ``steering``) may sit at either level. A chat keeps its
    messages and leaves out ``prompt`` and ``system`` (generate's fields)."""
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"must be an object, not {json_type(options)}", field="options")
    own = ("model", "messages", "stream") if chat else ("model", "prompt", "stream", "system")
    flat = {k: v for k, v in body.items() if k in own or k.startswith("steer")}
    flat.update((k, v) for k, v in options.items() if k not in _TOP_LEVEL)
    if flat.get("stream") is None:
        flat["stream"] = True  # Ollama streams unless told not to
    if flat.get("num_predict") == -2:  # "until the context is full": the server's default
        flat["num_predict"] = -1
    if "system" in flat and not isinstance(flat["system"], str):
        raise InvalidArgumentError("must be a string", field="system")
    return flat


class OllamaAnswer:
    """Engine events as Ollama's ``/api/generate`` lines (one row)."""

    media_type = "application/x-ndjson"

    def __init__(self, parsed: OpenAIRequest, model: str, *, chat: bool) -> None:
        self.parsed, self.model, self.chat = parsed, model, chat
        self.timer = Timer()

    async def collect(self, subscription: Subscription) -> dict[str, Any]:
        events = [event async for event in self.timer.events(subscription)]
        return self._final(events, "".join(event.text for event in events))

    async def stream(self, subscription: Subscription) -> AsyncIterator[bytes]:
        events: list[GenerationEvent] = []
        try:
            async for event in self.timer.events(subscription):
                events.append(event)
                if event.text:
                    piece = {"model": self.model, "created_at": _now()}
                    yield _line({**piece, **_text(event.text, self.chat), "done": False})
            yield _line(self._final(events, ""))
        except Exception as error:  # after the first byte, an error can only be a line
            yield _line({"error": error_body(error)[1]["message"]})
        finally:
            subscription.cancel()

    def _final(self, events: list[GenerationEvent], text: str) -> dict[str, Any]:
        last = events[-1] if events else GenerationEvent(request_id="")
        usage = last.usage
        prompt_ns, eval_ns = self.timer.durations()
        return {
            "model": self.model,
            "created_at": _now(),
            **_text(text, self.chat),
            "done": True,
            "done_reason": _DONE_REASON.get(last.finish_reason or "", "stop"),
            "total_duration": prompt_ns + eval_ns,
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens if usage is not None else 0,
            "prompt_eval_duration": prompt_ns,
            "eval_count": sum(len(event.token_ids) for event in events),
            "eval_duration": eval_ns,
        }


def _text(text: str, chat: bool) -> dict[str, Any]:
    """A reply's text as each route carries it."""
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _line(body: Mapping[str, Any]) -> bytes:
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()
