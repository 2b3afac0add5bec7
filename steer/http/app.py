"""The OpenAI-compatible HTTP API: what SillyTavern and every OpenAI client speak.

Routes (served by ``steer serve`` beside gRPC, on the same event loop):

* ``GET /health``; ``GET /v1/models`` and ``GET /v1/model/list`` (TabbyAPI's status check)
* ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE) or not
* ``GET /v1/steer/sliders``: the operator's named sliders, as a UI draws them
* the tokenizer routes of TabbyAPI, KoboldCpp, llama.cpp, vLLM and text-generation-webui, and
  their current-model routes (:mod:`steer.http.tokens`)

A request body is parsed by :func:`steer.http.fields.parse_request` (every sampler field under
every name SillyTavern sends), turned into ``GenerateRequest`` messages, and run by
:meth:`ServiceCore.start_generation`: the same conversion, engine rows and sliders as gRPC.
``n`` choices are rows of one batch. Errors are OpenAI's JSON error shape with the HTTP status of
the error catalogue (:data:`steer.errors.HTTP_STATUS`); never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steer.errors import (
    HTTP_STATUS,
    InvalidArgumentError,
    ResourceExhaustedError,
    SteerError,
    UnauthenticatedError,
)
from steer.generation import GenerationEvent
from steer.http.fields import OpenAIRequest, parse_request
from steer.http.tokens import add_token_routes
from steer.json_input import parse_object
from steer.proto.v1 import generation_pb2
from steer.rp.cards import card_to_json
from steer.service import convert
from steer.service.auth import bearer_matches
from steer.service.core import ServiceCore
from steer.service.failures import describe
from steer.service.scheduler import Subscription
from steer.service.sliders import named_interventions

log = logging.getLogger("steer.http")

#: response header naming sampler fields the request set that steer does not have
IGNORED_HEADER = "X-Steer-Ignored-Fields"
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}
_PUBLIC = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


def create_app(core: ServiceCore) -> FastAPI:
    """The FastAPI application over ``core`` (its OpenAPI page is at ``/docs``)."""
    app = FastAPI(title="steer", summary="OpenAI-compatible API with steering sliders")
    app.state.core = core

    app.add_middleware(_Guard, core=core)

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, error: HTTPException) -> Response:
        # the router's own answers (no such route: 404, a method it does not take: 405) in
        # OpenAI's error shape like every other error, not Starlette's {"detail": ...}
        return routing_error_response(error)

    @app.get("/health")
    async def health() -> JSONResponse:
        if core.draining.is_set():
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    @app.get("/v1/model/list")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": created, "owned_by": "steer"}
                for model_id in core.registry.all()
            ],
        }

    @app.get("/v1/steer/sliders")
    async def sliders() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [s.describe() for _, s in sorted(core.sliders.sliders.items())],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(core, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(core, request, chat=True)

    add_token_routes(app, core, _read_body)
    return app


class _Guard:
    """Checks the bearer token, and turns every failure before the response starts into
    OpenAI's error JSON. A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would pass
    every streamed chunk through a memory stream and a task switch of its own."""

    def __init__(self, app: ASGIApp, core: ServiceCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            _authorise(self.core, Request(scope))
            await self.app(scope, receive, watch)
        except Exception as error:  # every failure becomes OpenAI's error JSON
            if started:
                raise
            await error_response(error)(scope, receive, send)


def _authorise(core: ServiceCore, request: Request) -> None:
    token = core.settings.token
    if token is None or request.url.path in _PUBLIC:
        return
    given = request.headers.get("authorization", "")
    if not bearer_matches(given, token):
        raise UnauthenticatedError("missing or wrong bearer token (Authorization header)")


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error object ``{"message", "type", "param", "code"}``)."""
    failure = describe(error)
    code, field = failure.code, failure.field
    body = {"message": failure.message, "type": code.lower(), "param": field, "code": code}
    status = HTTP_STATUS.get(code, 500)
    if code == "RESOURCE_EXHAUSTED" and field != "queue":
        # a full queue is "retry later" (429); a prompt or body over a limit is the request's
        # own fault and retrying it cannot help (OpenAI answers 400 for context length)
        status = 413 if field == "body" else 400
    return status, body


def error_response(error: BaseException) -> JSONResponse:
    status, body = error_body(error)
    return JSONResponse({"error": body}, status_code=status)


def routing_error_response(error: HTTPException) -> Response:
    """Starlette's HTTPException (404 no such route, 405 method not allowed) in OpenAI's shape,
    with its headers (``Allow`` for a 405)."""
    try:
        code = HTTPStatus(error.status_code).name
    except ValueError:
        code = str(error.status_code)
    body = {"message": str(error.detail), "type": code.lower(), "param": None, "code": code}
    return JSONResponse({"error": body}, status_code=error.status_code, headers=error.headers)


# -- one generation -------------------------------------------------------------------------


async def _read_body(core: ServiceCore, request: Request) -> dict[str, Any]:
    limit = core.settings.max_message_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResourceExhaustedError(f"the body is over {limit} bytes", field="body")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ResourceExhaustedError(f"the body is over {limit} bytes", field="body")
    return parse_object(bytes(body), what="the request body", field="body")


async def _generate(core: ServiceCore, request: Request, *, chat: bool) -> Response:
    parsed = parse_request(await _read_body(core, request), chat=chat)
    messages, renames = _generate_requests(core, parsed)
    try:
        plans, subscription = await core.start_generation(messages)
    except SteerError as error:
        _rename(error, renames)
        raise
    del plans  # one row per choice, in order: the subscription's index is the choice index
    handle = core.registry.get(messages[0].model).handle
    answer = _Answer(parsed, chat, messages[0].model or core.registry.default_model, handle)
    headers = {IGNORED_HEADER: ", ".join(parsed.ignored)} if parsed.ignored else {}
    if parsed.stream:
        return StreamingResponse(
            answer.stream(subscription), media_type="text/event-stream", headers=headers
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, subscription))
    try:
        body = await answer.collect(subscription)
    finally:
        watcher.cancel()
        subscription.cancel()
    return JSONResponse(body, headers=headers)


async def _cancel_on_disconnect(request: Request, subscription: Subscription) -> None:
    """A non-streaming client that goes away frees its rows at the next step (a streaming one
    does so by itself: Starlette cancels its response when the connection closes)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    subscription.cancel()


def _generate_requests(
    core: ServiceCore, parsed: OpenAIRequest
) -> tuple[list[generation_pb2.GenerateRequest], dict[str, str]]:
    """One GenerateRequest per choice, and how to name their intervention fields back in the
    client's words (``interventions[0]...`` -> ``steer.moralizing``)."""
    base = generation_pb2.GenerateRequest(
        model=parsed.model,
        max_new_tokens=parsed.max_new_tokens or 0,
        stop=list(parsed.stop),
        top_logprobs=parsed.logprobs,
        sampling=convert.sampling_params(parsed.sampling),
    )
    _set_prompt(base, parsed)
    renames: dict[str, str] = {}
    for index, item in enumerate(named_interventions(parsed.sliders)):
        base.interventions.append(item)
        renames[f"interventions[{index}]"] = f"steer.{item.named.name}"
    offset = len(base.interventions)
    for index, entry in enumerate(parsed.steering):
        base.interventions.append(_steering_entry(entry, f"steering[{index}]"))
        renames[f"interventions[{offset + index}]"] = f"steering[{index}]"
    seed = parsed.sampling.seed
    requests = []
    for choice in range(parsed.n):
        request = generation_pb2.GenerateRequest()
        request.CopyFrom(base)
        if seed is not None:
            request.seed = (seed + choice) % 2**63  # distinct choices, each reproducible
        requests.append(request)
    return requests, renames


def _rename(error: SteerError, renames: Mapping[str, str]) -> None:
    """Name the field as the client sent it: ``interventions[0].named.value`` was the flat
    ``steer.cheerful`` field, ``interventions[2].add.strength`` was ``steering[1].add.strength``,
    ``sampling.dry_multiplier`` was ``dry_multiplier``."""
    field = error.field or ""
    for prefix, name in renames.items():
        if field == prefix or field.startswith(prefix + "."):
            rest = field[len(prefix) :]
            if rest.startswith(".named"):
                rest = ""  # a slider is one number: its name is the whole story
            error.field = name + rest
            return
    if field.startswith("sampling."):  # a sampler is a top-level field of the HTTP request
        error.field = field.removeprefix("sampling.")


def _steering_entry(entry: Mapping[str, Any], field: str) -> generation_pb2.Intervention:
    """One entry of the nested ``steering`` list: the JSON form of a gRPC Intervention."""
    message = generation_pb2.Intervention()
    try:
        json_format.ParseDict(dict(entry), message)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
        raise InvalidArgumentError(f"not an Intervention: {error}", field=field) from None
    return message


def _set_prompt(message: generation_pb2.GenerateRequest, parsed: OpenAIRequest) -> None:
    if parsed.prompt is not None:
        message.text = parsed.prompt
        return
    assert parsed.messages is not None
    plain = parsed.prompt_format is None and parsed.card is None
    if plain and not any(turn.name for turn in parsed.messages):
        message.chat.messages.extend(
            generation_pb2.ChatMessage(role=turn.role, content=turn.content)
            for turn in parsed.messages
        )
        return
    scene, speaker = _scene(parsed)
    message.roleplay.scene_json = json.dumps(scene)
    if parsed.card is not None:
        message.roleplay.card_json = json.dumps(card_to_json(parsed.card))
    message.roleplay.prompt_format = parsed.prompt_format or "chat_template"
    message.roleplay.speaker = speaker


def _scene(parsed: OpenAIRequest) -> tuple[dict[str, Any], str]:
    """A group chat as a steer.rp scene: each named speaker a character, so speaker-scoped
    interventions act on that character's words. The reply is written by the last named
    assistant speaker (SillyTavern names the next speaker last). With a card, unnamed assistant
    turns are the card's character, who replies unless another is named; the card's
    character, scenario and first message join the scene when the server renders it."""
    assert parsed.messages is not None
    card = parsed.card.name if parsed.card is not None else None
    system = "\n\n".join(turn.content for turn in parsed.messages if turn.role == "system")
    user = next((t.name for t in parsed.messages if t.role == "user" and t.name), "User")
    characters: list[str] = []
    turns = []
    for turn in parsed.messages:
        if turn.role == "system":
            continue
        name = turn.name or (user if turn.role == "user" else card or "Assistant")
        if turn.role == "assistant" and name not in characters and name != card:
            characters.append(name)
        turns.append({"speaker": name, "content": turn.content})
    speaker = characters[-1] if characters else card or "Assistant"
    listed = characters or ([] if card else [speaker])
    scene = {
        "user": {"name": user},
        "characters": [{"name": name} for name in listed],
        "turns": turns,
        "system": system,
    }
    return scene, speaker


# -- answers ----------------------------------------------------------------------------------


class _Answer:
    """Turns engine events into OpenAI completion or chat-completion JSON."""

    def __init__(self, parsed: OpenAIRequest, chat: bool, model: str, handle: Any) -> None:
        self.parsed, self.chat, self.model, self.handle = parsed, chat, model, handle
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return str(self.handle.tokenizer.decode([token_id]))

    def _logprobs(self, events: list[GenerationEvent]) -> dict[str, Any] | None:
        if not self.parsed.logprobs:
            return None
        entries = []
        for event in events:
            for token_id in event.token_ids:
                candidates = dict(event.top_logprobs)
                entries.append((token_id, candidates.get(token_id), event.top_logprobs))
        if self.chat:
            return {"content": [self._chat_logprob(*entry) for entry in entries]}
        return {
            "tokens": [self._token(token) for token, _, _ in entries],
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in top} for _, _, top in entries],
        }

    def _chat_logprob(
        self, token: int, logprob: float | None, top: tuple[tuple[int, float], ...]
    ) -> dict[str, Any]:
        text = self._token(token)
        return {
            "token": text,
            "logprob": logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode())}
                for t, lp in top
            ],
        }

    def _choice(self, index: int, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        kind = f"{self.object}.chunk" if chunk and self.chat else self.object
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    async def collect(self, subscription: Subscription) -> dict[str, Any]:
        events: dict[int, list[GenerationEvent]] = {i: [] for i in range(self.parsed.n)}
        async for index, event in subscription:
            events[index].append(event)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, stream in events.items():
            final = stream[-1]
            text = "".join(event.text for event in stream)
            choices.append(
                self._choice(
                    index, text, _FINISH.get(final.finish_reason or ""), self._logprobs(stream)
                )
            )
            if final.usage is not None:
                prompt_tokens = final.usage.prompt_tokens
                completion_tokens += final.usage.completion_tokens
        body = self._envelope(choices)
        body["usage"] = _usage(prompt_tokens, completion_tokens)
        return body

    async def stream(self, subscription: Subscription) -> AsyncIterator[bytes]:
        prompt_tokens, completion_tokens = 0, 0
        try:
            if self.chat:
                for index in range(self.parsed.n):
                    yield _sse(self._envelope([self._delta(index, "", None, role=True)], True))
            async for index, event in subscription:
                finish = _FINISH.get(event.finish_reason or "")
                logprobs = self._logprobs([event])
                choice = self._delta(index, event.text, finish, logprobs=logprobs)
                yield _sse(self._envelope([choice], chunk=True))
                if event.usage is not None:
                    prompt_tokens = event.usage.prompt_tokens
                    completion_tokens += event.usage.completion_tokens
            if self.parsed.include_usage:
                body = self._envelope([], chunk=True)
                body["usage"] = _usage(prompt_tokens, completion_tokens)
                yield _sse(body)
        except Exception as error:  # after the first byte, an error can only be a chunk
            yield _sse({"error": error_body(error)[1]})
        finally:
            subscription.cancel()
        yield b"data: [DONE]\n\n"

    def _delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        *,
        role: bool = False,
        logprobs: Any = None,
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(body: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
