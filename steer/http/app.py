"""The OpenAI-compatible HTTP API: what SillyTavern and every OpenAI client speak.

Routes (served by ``steer serve`` beside gRPC, on the same event loop):

* ``GET /health``; ``GET /v1/models`` and ``GET /v1/model/list`` (TabbyAPI's status check)
* ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE) or not
* ``POST /completion``: llama.cpp's own completion route and reply shape
  (:mod:`steer.http.llamacpp`), which SillyTavern's llama.cpp type posts to
* ``POST /api/generate``, ``POST /api/chat`` and ``GET /api/tags``: Ollama's
  (:mod:`steer.http.ollama`)
* ``GET /v1/steer/sliders``: the operator's named sliders, as a UI draws them
* the tokenizer routes of TabbyAPI, KoboldCpp, llama.cpp, vLLM and text-generation-webui, and
  their current-model routes (:mod:`steer.http.tokens`)

A request body is parsed by :func:`steer.http.fields.parse_request` (every sampler field under
every name SillyTavern sends), turned into ``GenerateRequest`` messages, and run by
:meth:`ServiceCore.start_generation`: the same conversion, engine rows and sliders as gRPC.
``n`` choices are rows of one batch. Replies and errors are shaped in :mod:`steer.http.answers`
(OpenAI's error JSON with the HTTP status of the error catalogue; never a stack trace).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steer.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    SteerError,
    UnauthenticatedError,
)
from steer.http import llamacpp, ollama
from steer.http.answers import (
    Answer,
    OpenAIAnswer,
    error_response,
    models_body,
    routing_error_response,
)
from steer.http.fields import OpenAIRequest, parse_request
from steer.http.tokens import add_token_routes
from steer.json_input import parse_object
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2
from steer.rp.cards import card_to_json
from steer.service import convert
from steer.service.auth import bearer_matches
from steer.service.core import ServiceCore
from steer.service.scheduler import Subscription
from steer.service.sliders import named_interventions

log = logging.getLogger("steer.http")

#: response header naming sampler fields the request set that steer does not have
IGNORED_HEADER = "X-Steer-Ignored-Fields"
#: a route's reply shape, made from the parsed request, the model id and its handle
AnswerFactory = Callable[[OpenAIRequest, str, ModelHandle], Answer]
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
        return models_body(core.registry.all())

    @app.get("/v1/steer/sliders")
    async def sliders() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [s.describe() for _, s in sorted(core.sliders.sliders.items())],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = parse_request(await _read_body(core, request), chat=False)
        return await _generate(core, request, parsed, _openai(chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = parse_request(await _read_body(core, request), chat=True)
        return await _generate(core, request, parsed, _openai(chat=True))

    @app.get(ollama.TAGS)
    async def ollama_tags() -> dict[str, Any]:
        return ollama.tags_body(core.registry.all())

    @app.post(ollama.GENERATE)
    async def ollama_generate(request: Request) -> Response:
        return await _ollama(core, request, chat=False)

    @app.post(ollama.CHAT)
    async def ollama_chat(request: Request) -> Response:
        return await _ollama(core, request, chat=True)

    @app.post(llamacpp.ROUTE)
    async def llamacpp_completion(request: Request) -> Response:
        parsed, reply = llamacpp.read_request(await _read_body(core, request))
        return await _generate(core, request, parsed, reply.answer)

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


def _openai(*, chat: bool) -> AnswerFactory:
    def make(parsed: OpenAIRequest, model: str, handle: ModelHandle) -> Answer:
        return OpenAIAnswer(parsed, chat, model, handle)

    return make


async def _generate(
    core: ServiceCore, request: Request, parsed: OpenAIRequest, make_answer: AnswerFactory
) -> Response:
    """Run ``parsed`` (its ``n`` choices as rows of one batch) and reply in ``make_answer``'s
    shape: an SSE stream when the request streams, else one JSON body."""
    messages, renames = _generate_requests(core, parsed)
    try:
        plans, subscription = await core.start_generation(messages)
    except SteerError as error:
        _rename(error, renames)
        raise
    del plans  # one row per choice, in order: the subscription's index is the choice index
    handle = core.registry.get(messages[0].model).handle
    answer = make_answer(parsed, messages[0].model or core.registry.default_model, handle)
    headers = {IGNORED_HEADER: ", ".join(parsed.ignored)} if parsed.ignored else {}
    if parsed.stream:
        return StreamingResponse(
            answer.stream(subscription), media_type=answer.media_type, headers=headers
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, subscription))
    try:
        body = await answer.collect(subscription)
    finally:
        watcher.cancel()
        subscription.cancel()
    return JSONResponse(body, headers=headers)


async def _ollama(core: ServiceCore, request: Request, *, chat: bool) -> Response:
    parsed, reply = ollama.read_request(await _read_body(core, request), chat=chat)
    if parsed is None:  # no prompt: Ollama's "load the model" call
        return JSONResponse(reply.loaded(core.registry.get(reply.model).model_id))
    return await _generate(core, request, parsed, reply.answer)


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
    if parsed.prompt_ids is not None:  # the engine's and the proto's names for the ids
        renames.update({"prompt_ids": "prompt", "token_ids.ids": "prompt"})
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
    if parsed.prompt_ids is not None:
        message.token_ids.ids.extend(parsed.prompt_ids)
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
