"""Generate: a GenerateRequest -> the engine requests it runs as (a :class:`GenerationPlan`),
and each engine event -> a GenerateResponse.

Errors name the request field in proto terms (``stop[2]``, ``chat.messages[0].role``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from steer.errors import InvalidArgumentError, ResourceExhaustedError, SteerError, within
from steer.generation import GenerationEvent, GenerationRequest, Message
from steer.interventions import Intervention
from steer.json_input import parse_object
from steer.limits import check_text_size
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2
from steer.service.convert.interventions import intervention
from steer.service.convert.sampling import sampling_config
from steer.service.registry import LoadedModel
from steer.service.saes import SaeRegistry
from steer.service.settings import ServerSettings
from steer.service.sliders import SliderCatalogue
from steer.service.store import ArtifactStore
from steer.wire import FINISH_REASONS

if TYPE_CHECKING:
    from steer.rp.scene import Character

ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("", "chat_template")
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class GenerationPlan:
    """The engine requests one Generate call turns into, and the side each one streams as."""

    requests: tuple[GenerationRequest, ...]
    sides: tuple[Any, ...]


def generation_plan(
    message: generation_pb2.GenerateRequest,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    settings: ServerSettings,
    sliders: SliderCatalogue | None = None,
) -> GenerationPlan:
    """The engine requests of one Generate call; named sliders the request leaves out take
    their default values."""
    prompt: dict[str, Any] = _prompt(message, loaded.handle, settings)
    extra_stop = tuple(prompt.pop("extra_stop", ()))
    max_new_tokens, stop = _check_limits(message, settings)
    interventions = _interventions(message, loaded, store, saes, sliders or SliderCatalogue())
    seed = message.seed if message.HasField("seed") else None
    if message.compare and seed is None:
        seed = secrets.randbits(63)  # both sides sample alike
    base = GenerationRequest(
        **prompt,
        interventions=interventions,
        sampling=sampling_config(message.sampling, seed),
        max_new_tokens=max_new_tokens,
        stop=tuple(dict.fromkeys(stop + extra_stop)),
        top_logprobs=message.top_logprobs,
    )
    if not message.compare:
        return GenerationPlan((base,), (generation_pb2.SIDE_UNSPECIFIED,))
    default = replace(base, interventions=())
    return GenerationPlan(
        (default, base), (generation_pb2.SIDE_DEFAULT, generation_pb2.SIDE_STEERED)
    )


def _check_limits(
    message: generation_pb2.GenerateRequest, settings: ServerSettings
) -> tuple[int, tuple[str, ...]]:
    """The request's length and stop strings within this server's limits, and its count of
    interventions. What holds on every engine (``max_new_tokens`` >= 1, ``top_logprobs`` in
    [0, 20]) is :meth:`steer.generation.Engine.submit`'s to check, once."""
    max_new_tokens = message.max_new_tokens or settings.default_max_new_tokens
    if max_new_tokens > settings.max_new_tokens_cap:
        raise InvalidArgumentError(
            f"{max_new_tokens} is above this server's limit of {settings.max_new_tokens_cap}",
            field="max_new_tokens",
        )
    stop = tuple(message.stop)
    if len(stop) > settings.max_stop_strings:
        raise InvalidArgumentError(
            f"{len(stop)} stop strings; at most {settings.max_stop_strings}", field="stop"
        )
    for index, text in enumerate(stop):
        if not text or len(text) > MAX_STOP_LENGTH:
            raise InvalidArgumentError(
                f"stop strings must have 1-{MAX_STOP_LENGTH} characters", field=f"stop[{index}]"
            )
    if len(message.interventions) > settings.max_interventions:
        raise InvalidArgumentError(
            f"{len(message.interventions)} interventions; at most {settings.max_interventions}",
            field="interventions",
        )
    return max_new_tokens, stop


def _interventions(
    message: generation_pb2.GenerateRequest,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    sliders: SliderCatalogue,
) -> tuple[Intervention, ...]:
    """The request's interventions, then the defaults of the named sliders it leaves out."""
    built = [
        one
        for index, item in enumerate(message.interventions)
        for one in intervention(item, loaded, store, saes, f"interventions[{index}]", sliders)
    ]
    named = {item.named.name for item in message.interventions if item.HasField("named")}
    for name, item in sliders.defaults(excluding=named):
        built.extend(intervention(item, loaded, store, saes, f"sliders.{name}", sliders))
    return tuple(built)


def _card(card_json: str) -> Character:
    """A role-play prompt's card; its errors name ``roleplay.card_json`` (and the key)."""
    from steer.rp.cards import card_from_json

    data = parse_object(card_json, what="the card", field="roleplay.card_json")
    try:
        return card_from_json(data)
    except SteerError as error:
        key = (error.field or "").removeprefix("card").lstrip(".")
        field = f"roleplay.card_json.{key}" if key else "roleplay.card_json"
        raise InvalidArgumentError(error.message, field=field) from None


def _roleplay(message: generation_pb2.RolePlayPrompt, handle: ModelHandle) -> dict[str, Any]:
    from steer.rp.cards import scene_with_card
    from steer.rp.formats import get_format, tokenize
    from steer.rp.scene import Scene

    card = _card(message.card_json) if message.card_json else None
    scene_json = message.scene_json or ("{}" if card is not None else "")
    data = parse_object(scene_json, what="the scene", field="roleplay.scene_json")
    try:
        scene = Scene.from_dict(data) if card is None else scene_with_card(card, data)
        speaker = message.speaker or scene.characters[0].name
        rendered = get_format(message.prompt_format or "chat_template").render(
            scene, speaker, length=message.length or None, tokenizer=handle.tokenizer
        )
        tokens = tokenize(handle.tokenizer, rendered)
    except SteerError as error:
        raise within(error, "roleplay") from None
    return {
        "prompt_ids": tokens.ids,
        "speakers": tokens.speakers,
        "speaker": speaker,
        "extra_stop": rendered.stop,
    }


def _prompt(
    message: generation_pb2.GenerateRequest, handle: ModelHandle, settings: ServerSettings
) -> dict[str, Any]:
    which = message.WhichOneof("prompt")
    if which is None:
        raise InvalidArgumentError("set one of text, chat or token_ids", field="prompt")
    _check_prompt_size(message, which, settings)
    if which == "text":
        if not message.text:
            raise InvalidArgumentError("the prompt is empty", field="text")
        return {"prompt": message.text}
    if which == "token_ids":
        if not message.token_ids.ids:
            raise InvalidArgumentError("no token ids", field="token_ids.ids")
        return {"prompt_ids": tuple(message.token_ids.ids)}
    if which == "roleplay":
        return _roleplay(message.roleplay, handle)
    chat = message.chat
    if chat.prompt_format not in PROMPT_FORMATS:
        raise InvalidArgumentError(
            f"unknown prompt format {chat.prompt_format!r}; this server knows "
            f"{', '.join(repr(f) for f in PROMPT_FORMATS)}",
            field="chat.prompt_format",
        )
    if not chat.messages:
        raise InvalidArgumentError("no messages", field="chat.messages")
    messages = []
    for index, item in enumerate(chat.messages):
        if item.role not in ROLES:
            raise InvalidArgumentError(
                f"unknown role {item.role!r}; use {', '.join(ROLES)}",
                field=f"chat.messages[{index}].role",
            )
        messages.append(Message(item.role, item.content))
    return {"messages": tuple(messages)}


def _check_prompt_size(
    message: generation_pb2.GenerateRequest, which: str, settings: ServerSettings
) -> None:
    """Refuse an oversized prompt by its size, before parsing or tokenising it."""
    limit = settings.max_prompt_tokens
    if which == "token_ids" and len(message.token_ids.ids) > limit:
        raise ResourceExhaustedError(
            f"{len(message.token_ids.ids)} token ids; this server accepts at most {limit}",
            field="token_ids.ids",
        )
    if which == "roleplay":
        check_text_size(len(message.roleplay.scene_json), limit, "roleplay.scene_json")
        check_text_size(len(message.roleplay.card_json), limit, "roleplay.card_json")
    elif which == "chat":
        characters = sum(len(item.content) for item in message.chat.messages)
        check_text_size(characters, limit, "chat.messages")


def generate_response(event: GenerationEvent, side: Any) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(
        side=side, token_ids=list(event.token_ids), text=event.text
    )
    if event.top_logprobs:
        response.top_logprobs.add().candidates.extend(
            generation_pb2.TokenLogprob(token_id=token, logprob=logprob)
            for token, logprob in event.top_logprobs
        )
    if event.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[event.finish_reason]
        if event.usage is not None:
            response.usage.prompt_tokens = event.usage.prompt_tokens
            response.usage.completion_tokens = event.usage.completion_tokens
        if event.seed is not None:
            response.seed = event.seed
    return response


def side_names(sides: Sequence[int]) -> list[str]:
    return [generation_pb2.Side.Name(side) for side in sides]
