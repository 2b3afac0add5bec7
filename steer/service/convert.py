"""Proto messages <-> steer domain objects. The only module that knows both sides.

Errors raised here name the request field in proto terms (``interventions[2].add.strength``), so
a client can find the part of its request that was wrong.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from steer.errors import InvalidArgumentError, ResourceExhaustedError, SteerError
from steer.generation import GenerationEvent, GenerationRequest, Message
from steer.interventions import Ablate, Add, Intervention, Phase, validate
from steer.json_input import parse_object
from steer.limits import check_text_size
from steer.models import ModelHandle
from steer.proto.v1 import directions_pb2, features_pb2, generation_pb2, jobs_pb2, models_pb2
from steer.sae.modes import SliderMode
from steer.sampling import SamplingConfig
from steer.service.jobs import JobSnapshot
from steer.service.registry import LoadedModel
from steer.service.saes import LoadedSae, SaeRegistry
from steer.service.settings import ServerSettings
from steer.service.sliders import Slider, SliderCatalogue
from steer.service.store import ArtifactFiles, ArtifactStore
from steer.vectors import SteeringVector

if TYPE_CHECKING:
    from steer.rp.scene import Character
    from steer.sae.features import FeatureInfo, RankedFeature, TextFeatures

ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("", "chat_template")
MAX_STOP_LENGTH = 256

_PHASES = {
    generation_pb2.PHASE_UNSPECIFIED: Phase.ALL,
    generation_pb2.PHASE_ALL: Phase.ALL,
    generation_pb2.PHASE_PROMPT: Phase.PROMPT,
    generation_pb2.PHASE_GENERATED: Phase.GENERATED,
}
_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "cancelled": generation_pb2.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class GenerationPlan:
    """The engine requests one Generate call turns into, and the side each one streams as."""

    requests: tuple[GenerationRequest, ...]
    sides: tuple[Any, ...]


def _renamed(error: SteerError, prefix: str) -> InvalidArgumentError:
    field = f"{prefix}.{error.field}" if error.field else prefix
    return InvalidArgumentError(error.message, field=field)


# -- Generate ---------------------------------------------------------------------------------


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
    handle = loaded.handle
    prompt: dict[str, Any] = _prompt(message, handle, settings)
    extra_stop = tuple(prompt.pop("extra_stop", ()))
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
    if message.top_logprobs > 20:
        raise InvalidArgumentError("must be in [0, 20]", field="top_logprobs")
    if len(message.interventions) > settings.max_interventions:
        raise InvalidArgumentError(
            f"{len(message.interventions)} interventions; at most {settings.max_interventions}",
            field="interventions",
        )
    sliders = sliders or SliderCatalogue()
    built = [
        intervention(item, loaded, store, saes, f"interventions[{index}]", sliders)
        for index, item in enumerate(message.interventions)
    ]
    named = {item.named.name for item in message.interventions if item.HasField("named")}
    built.extend(
        intervention(item, loaded, store, saes, f"sliders.{name}", sliders)
        for name, item in sliders.defaults(excluding=named)
    )
    interventions = tuple(item for item in built if item is not None)
    seed = message.seed if message.HasField("seed") else None
    if message.compare and seed is None:
        seed = secrets.randbits(63)
    sampling = sampling_config(message.sampling, seed)
    base = GenerationRequest(
        **prompt,
        interventions=interventions,
        sampling=sampling,
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
        raise _renamed(error, "roleplay") from None
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
        raise _renamed(error, "sampling") from None


def _inline_vector(message: generation_pb2.InlineVector, field: str) -> SteeringVector:
    per_layer: dict[int, list[float]] = {}
    for index, layer in enumerate(message.layers):
        if layer.layer in per_layer:
            raise InvalidArgumentError(
                f"layer {layer.layer} given twice", field=f"{field}.layers[{index}].layer"
            )
        per_layer[layer.layer] = list(layer.values)
    shared = list(message.shared) or None
    try:
        return SteeringVector(per_layer=per_layer, shared=shared)  # type: ignore[arg-type]
    except SteerError as error:
        raise InvalidArgumentError(error.message, field=field) from None


def intervention(
    message: generation_pb2.Intervention,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
    sliders: SliderCatalogue | None = None,
) -> Intervention | None:
    """The domain intervention of one proto intervention (None: a named slider at its neutral
    value, which does nothing)."""
    which = message.WhichOneof("kind")
    if which is None:
        raise InvalidArgumentError("set ablate, add, slider or named", field=field)
    if which == "named":
        catalogue = sliders or SliderCatalogue()
        slider = catalogue.get(message.named.name, f"{field}.named.name")
        resolved = slider.intervention(
            message.named.value, field=f"{field}.named.value", speaker=message.speaker
        )
        if resolved is None:
            return None
        return intervention(resolved, loaded, store, saes, f"{field}.named", catalogue)
    return _intervention(message, which, loaded, store, saes, f"{field}.{which}")


def _intervention(
    message: generation_pb2.Intervention,
    which: str,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
) -> Intervention:
    handle = loaded.handle
    built: Intervention
    try:
        if which == "slider":
            built = _slider(message.slider, message.speaker or None, loaded, saes)
        elif which == "ablate":
            ablate = message.ablate
            if not ablate.artifact_id:
                raise InvalidArgumentError("required", field="artifact_id")
            artifact = store.load_for(
                ablate.artifact_id,
                handle,
                allow_other_model=ablate.allow_other_model,
                field="artifact_id",
            )
            layers = tuple(ablate.layers) or None
            if layers is None and artifact.vector.shared is None:
                layers = artifact.vector.layers  # a per-layer direction acts where it has vectors
            built = Ablate(
                artifact.vector,
                layers=layers,
                weight=ablate.weight if ablate.HasField("weight") else 1.0,
                layer_weights=dict(ablate.layer_weights) or None,
                speaker=message.speaker or None,
            )
        else:
            add = message.add
            hooks = tuple(add.hooks)
            source = add.WhichOneof("vector")
            if source is None:
                raise InvalidArgumentError("set artifact_id or inline", field="vector")
            if source == "artifact_id":
                artifact = store.load_for(
                    add.artifact_id,
                    handle,
                    allow_other_model=add.allow_other_model,
                    field="artifact_id",
                )
                vector = artifact.vector
                if not hooks:
                    hooks = tuple(str(h) for h in artifact.metadata.get("hooks") or ())
            else:
                vector = _inline_vector(add.inline, "inline")
            if add.phase not in _PHASES:
                raise InvalidArgumentError(f"unknown phase {add.phase}", field="phase")
            built = Add(
                vector,
                strength=add.strength,
                hooks=hooks,
                phase=_PHASES[add.phase],
                speaker=message.speaker or None,
            )
        validate([built], handle.resolver, handle.d_model)
    except SteerError as error:
        if error.status_code != "INVALID_ARGUMENT":
            error.field = f"{field}.{error.field}" if error.field else field
            raise
        raise _renamed(error, field) from None
    return built


#: proto slider mode -> steer's
_SLIDER_MODES = {
    generation_pb2.SLIDER_MODE_CLAMP: SliderMode.CLAMP,
    generation_pb2.SLIDER_MODE_SCALE: SliderMode.SCALE,
    generation_pb2.SLIDER_MODE_ADD_DECODER: SliderMode.ADD_DECODER,
}


def _slider(
    message: generation_pb2.FeatureSlider,
    speaker: str | None,
    loaded: LoadedModel,
    saes: SaeRegistry,
) -> Intervention:
    """A :mod:`steer.sae.sliders` intervention on an SAE loaded for this request's model."""
    from steer.sae.sliders import feature_slider

    if message.mode not in _SLIDER_MODES:
        raise InvalidArgumentError("set mode: clamp, scale or add_decoder", field="mode")
    if message.phase not in _PHASES:
        raise InvalidArgumentError(f"unknown phase {message.phase}", field="phase")
    if not message.sae_id:
        raise InvalidArgumentError("required", field="sae_id")
    entry = saes.get(message.sae_id)
    entry.check_model(loaded.handle, loaded.model_id, field="sae_id")
    return feature_slider(
        _SLIDER_MODES[message.mode],
        entry.sae,
        message.feature,
        message.value,
        _PHASES[message.phase],
        speaker,
    )


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
        response.finish_reason = _FINISH[event.finish_reason]
        if event.usage is not None:
            response.usage.prompt_tokens = event.usage.prompt_tokens
            response.usage.completion_tokens = event.usage.completion_tokens
        if event.seed is not None:
            response.seed = event.seed
    return response


def slider_info(slider: Slider) -> models_pb2.SliderInfo:
    info = models_pb2.SliderInfo(
        name=slider.name,
        kind=slider.kind,
        description=slider.description,
        min=slider.minimum,
        max=slider.maximum,
        default=slider.default,
    )
    if slider.neutral is not None:
        info.neutral = slider.neutral
    return info


# -- Models -----------------------------------------------------------------------------------


def model_info(loaded: LoadedModel, *, detailed: bool) -> models_pb2.ModelInfo:
    handle, worker = loaded.handle, loaded.worker
    info = handle.info()
    message = models_pb2.ModelInfo(
        model_id=loaded.model_id,
        source=loaded.source,
        architecture=info["architecture"],
        num_layers=info["num_layers"],
        d_model=info["d_model"],
        dtype=info["dtype"],
        device=info["device"],
        vocab_size=int(handle.model.config.vocab_size),
        stats=models_pb2.SchedulerStats(
            running=worker.running,
            waiting=worker.waiting,
            requests_total=worker.stats.requests_total,
            cancelled_total=worker.stats.cancelled_total,
            failed_total=worker.stats.failed_total,
            tokens_total=worker.stats.tokens_total,
        ),
    )
    if detailed:
        message.hook_names.extend(handle.hook_names())
        message.chat_template = handle.chat_template or ""
        message.weight_hash = handle.weight_hash
    return message


# -- Features ---------------------------------------------------------------------------------

DEFAULT_FEATURES = 10


def sae_info(entry: LoadedSae) -> features_pb2.SaeInfo:
    sae = entry.sae
    return features_pb2.SaeInfo(
        sae_id=entry.sae_id,
        model=entry.model_id,
        path=entry.path,
        hook_name=sae.hook_name,
        architecture=sae.architecture,
        d_in=sae.d_in,
        num_features=sae.num_features,
        sliders=sae.affine_decoder,
        metadata_json=json.dumps(dict(sae.metadata), sort_keys=True, default=str),
    )


def texts(
    values: Sequence[str], handle: ModelHandle, settings: ServerSettings, field: str
) -> list[str]:
    """A request's texts within the server's limits: how many, and tokens per text.

    Emptiness is the library's to check (it names the same field)."""
    if len(values) > settings.max_feature_texts:
        raise InvalidArgumentError(
            f"{len(values)} texts; at most {settings.max_feature_texts}", field=field
        )
    for index, text in enumerate(values):
        check_text_size(len(text), settings.max_prompt_tokens, f"{field}[{index}]")
        count = len(handle.tokenizer(text)["input_ids"])
        if count > settings.max_prompt_tokens:
            raise ResourceExhaustedError(
                f"{count} tokens; this server accepts at most {settings.max_prompt_tokens}",
                field=f"{field}[{index}]",
            )
    return list(values)


def ranked_feature(ranked: RankedFeature) -> features_pb2.RankedFeature:
    message = features_pb2.RankedFeature(
        feature=ranked.feature,
        score=ranked.score,
        mean_activation=ranked.mean_activation,
        frequency=ranked.frequency,
    )
    if ranked.mean_activation_b is not None:
        message.mean_activation_b = ranked.mean_activation_b
    if ranked.auroc is not None:
        message.auroc = ranked.auroc
    return message


def ranked_features(ranking: Sequence[RankedFeature]) -> features_pb2.RankedFeatures:
    return features_pb2.RankedFeatures(features=[ranked_feature(r) for r in ranking])


def activations_response(
    top: Sequence[RankedFeature], encoded: TextFeatures | None, k: int
) -> features_pb2.ActivationsResponse:
    response = features_pb2.ActivationsResponse(top=[ranked_feature(r) for r in top])
    if encoded is not None:
        for token_id, token, features in zip(
            encoded.token_ids, encoded.tokens, encoded.top_per_token(k), strict=True
        ):
            response.tokens.add(
                token_id=token_id,
                token=token,
                features=[
                    features_pb2.FeatureActivation(feature=feature, activation=activation)
                    for feature, activation in features
                ],
            )
    return response


def feature_info(info: FeatureInfo) -> features_pb2.FeatureInfo:
    message = features_pb2.FeatureInfo(
        feature=info.feature,
        hook_name=info.hook_name,
        decoder_norm=info.decoder_norm,
        promoted=[features_pb2.TokenEffect(token=t, logit=v) for t, v in info.promoted],
        suppressed=[features_pb2.TokenEffect(token=t, logit=v) for t, v in info.suppressed],
        top_snippets=[
            features_pb2.Snippet(
                text=s.text, activation=s.activation, token=s.token, marked=s.marked
            )
            for s in info.top_snippets
        ],
    )
    if info.density is not None:
        message.density = info.density
    return message


# -- Directions and jobs ----------------------------------------------------------------------


def artifact_info(artifact_id: str, description: dict[str, Any]) -> directions_pb2.ArtifactInfo:
    return directions_pb2.ArtifactInfo(artifact_id=artifact_id, **description)


def broken_artifact(artifact_id: str, reason: str) -> directions_pb2.BrokenArtifact:
    return directions_pb2.BrokenArtifact(artifact_id=artifact_id, reason=reason)


def artifact_files(message: directions_pb2.ArtifactFiles) -> ArtifactFiles:
    return ArtifactFiles(message.artifact_id, message.vectors_safetensors, message.steer_json)


def artifact_files_message(files: ArtifactFiles) -> directions_pb2.ArtifactFiles:
    return directions_pb2.ArtifactFiles(
        artifact_id=files.artifact_id,
        vectors_safetensors=files.vectors_safetensors,
        steer_json=files.steer_json,
    )


def job(snapshot: JobSnapshot) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=snapshot.job_id,
        kind=snapshot.kind,
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{snapshot.state.name}"),
        stage=snapshot.stage,
        progress=snapshot.progress,
        result=snapshot.result,
        result_metadata=snapshot.result_metadata,
        error_code=snapshot.error_code,
        error=snapshot.error,
    )


def side_names(sides: Sequence[int]) -> list[str]:
    return [generation_pb2.Side.Name(side) for side in sides]
