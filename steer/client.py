"""Python clients for the steer gRPC service: :class:`SteerClient` (sync) and
:class:`AsyncSteerClient` (asyncio).

Status codes come back as the :mod:`steer.errors` classes themselves (``InvalidArgument`` is
another name of :class:`~steer.errors.InvalidArgumentError`), with the server's ``field``.
Interventions are built with :func:`ablate`, :func:`add`, :func:`add_local` and :func:`slider`
(an SAE feature of an SAE loaded with ``load_sae``)::

    with SteerClient("127.0.0.1:50051") as client:
        for event in client.generate("Tell me a story", interventions=[add("calm", 4.0)]):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from steer import errors
from steer.proto.v1 import bake_pb2 as bake_messages
from steer.proto.v1 import bake_pb2_grpc as bake_services
from steer.proto.v1 import (
    directions_pb2,
    directions_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from steer.vectors import SteeringVector

DEFAULT_TARGET = "127.0.0.1:50051"

# -- errors -----------------------------------------------------------------------------------
# A failed call raises the steer.errors class of its status (with the server's ``field``, and
# ``code``, the grpc.StatusCode); these names are the same classes, kept for callers of old.

RemoteError = errors.SteerError
InvalidArgument = errors.InvalidArgumentError
NotFound = errors.NotFoundError
FailedPrecondition = errors.FailedPreconditionError
ResourceExhausted = errors.ResourceExhaustedError
AlreadyExists = errors.AlreadyExistsError
Unauthenticated = errors.UnauthenticatedError
Unavailable = errors.UnavailableError
Unimplemented = errors.UnimplementedError
Cancelled = errors.CancelledError
DeadlineExceeded = errors.DeadlineExceededError
Internal = errors.InternalError


def translate(error: grpc.RpcError) -> errors.SteerError:
    """The typed exception for a failed call (``grpc.RpcError`` from a sync or aio call)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    field_name = None
    trailing = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    )
    for key, value in trailing or ():
        if key == errors.FIELD_METADATA_KEY:
            field_name = value if isinstance(value, str) else value.decode()
    message = details or str(code)
    if field_name and message.startswith(f"{field_name}: "):
        message = message.removeprefix(f"{field_name}: ")
    raised = errors.error_for(code.name, message, field=field_name)
    raised.code = code
    return raised


# -- interventions ----------------------------------------------------------------------------

_PHASES = {
    "all": generation_pb2.PHASE_ALL,
    "prompt": generation_pb2.PHASE_PROMPT,
    "generated": generation_pb2.PHASE_GENERATED,
}


def ablate(
    artifact_id: str,
    *,
    layers: Sequence[int] = (),
    weight: float | None = None,
    layer_weights: Mapping[int, float] | None = None,
    allow_other_model: bool = False,
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Ablate the server-side direction ``artifact_id`` (only ``speaker``'s tokens if set)."""
    message = generation_pb2.AblateDirection(
        artifact_id=artifact_id,
        layers=list(layers),
        layer_weights=dict(layer_weights or {}),
        allow_other_model=allow_other_model,
    )
    if weight is not None:
        message.weight = weight
    return generation_pb2.Intervention(ablate=message, speaker=speaker)


def add(
    vector: str | SteeringVector | Sequence[float],
    strength: float = 1.0,
    *,
    hooks: Sequence[str] = (),
    phase: str = "all",
    allow_other_model: bool = False,
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Add a vector: a server artifact id, a :class:`SteeringVector`, or floats (shared).

    With ``speaker``, only that character's tokens are steered (role-play prompts)."""
    if phase not in _PHASES:
        raise errors.InvalidArgumentError(f"use one of {', '.join(_PHASES)}", field="phase")
    message = generation_pb2.AddVector(
        strength=strength,
        hooks=list(hooks),
        phase=_PHASES[phase],
        allow_other_model=allow_other_model,
    )
    if isinstance(vector, str):
        message.artifact_id = vector
    else:
        message.inline.CopyFrom(inline_vector(vector))
    return generation_pb2.Intervention(add=message, speaker=speaker)


def inline_vector(vector: SteeringVector | Sequence[float]) -> generation_pb2.InlineVector:
    if not isinstance(vector, SteeringVector):
        return generation_pb2.InlineVector(shared=[float(v) for v in vector])
    message = generation_pb2.InlineVector()
    if vector.shared is not None:
        message.shared.extend(vector.shared.tolist())
    for layer in vector.layers:
        message.layers.add(layer=layer, values=vector.per_layer[layer].tolist())
    return message


def add_local(
    path: str | Path,
    strength: float = 1.0,
    *,
    hooks: Sequence[str] | None = None,
    phase: str = "all",
) -> generation_pb2.Intervention:
    """Add a local vector artifact, sent inline; hooks default to the artifact's own."""
    from steer.artifacts import load_vector

    artifact = load_vector(path)
    if hooks is None:
        hooks = [str(h) for h in artifact.metadata.get("hooks") or ()]
    return add(artifact.vector, strength, hooks=hooks, phase=phase)


_SLIDER_MODES = {
    "clamp": generation_pb2.SLIDER_MODE_CLAMP,
    "scale": generation_pb2.SLIDER_MODE_SCALE,
    "add_decoder": generation_pb2.SLIDER_MODE_ADD_DECODER,
}


def slider(
    sae_id: str,
    feature: int,
    mode: str,
    value: float,
    *,
    phase: str = "all",
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Move feature ``feature`` of the server's SAE ``sae_id`` (see ``load_sae``).

    ``mode``: ``clamp`` (f = value), ``scale`` (f = value * f) or ``add_decoder``
    (f = f + value); the SAE's error term is kept, so ``scale`` 1 and ``add_decoder`` 0 change
    nothing."""
    if mode not in _SLIDER_MODES:
        raise errors.InvalidArgumentError(f"use one of {', '.join(_SLIDER_MODES)}", field="mode")
    if phase not in _PHASES:
        raise errors.InvalidArgumentError(f"use one of {', '.join(_PHASES)}", field="phase")
    message = generation_pb2.FeatureSlider(
        sae_id=sae_id, feature=feature, mode=_SLIDER_MODES[mode], value=value, phase=_PHASES[phase]
    )
    return generation_pb2.Intervention(slider=message, speaker=speaker)


# -- results ----------------------------------------------------------------------------------

_SIDES = {
    generation_pb2.SIDE_UNSPECIFIED: None,
    generation_pb2.SIDE_DEFAULT: "default",
    generation_pb2.SIDE_STEERED: "steered",
}
_FINISH = {
    generation_pb2.FINISH_REASON_UNSPECIFIED: None,
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class GenerateEvent:
    """One streamed message. ``side`` is "default"/"steered" in compare mode, else None."""

    side: str | None
    token_ids: tuple[int, ...]
    text: str
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seed: int | None = None

    @classmethod
    def from_proto(cls, message: generation_pb2.GenerateResponse) -> GenerateEvent:
        final = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
        return cls(
            side=_SIDES.get(message.side),
            token_ids=tuple(message.token_ids),
            text=message.text,
            top_logprobs=tuple(
                tuple((c.token_id, c.logprob) for c in top.candidates)
                for top in message.top_logprobs
            ),
            finish_reason=_FINISH.get(message.finish_reason),
            prompt_tokens=message.usage.prompt_tokens if final else None,
            completion_tokens=message.usage.completion_tokens if final else None,
            seed=message.seed if message.HasField("seed") else None,
        )


@dataclass
class Completion:
    """A finished completion, collected from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int | None = None

    def add(self, event: GenerateEvent) -> None:
        self.text += event.text
        self.token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens or 0
            self.completion_tokens = event.completion_tokens or 0
            self.seed = event.seed


def generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    model: str = "",
    interventions: Sequence[generation_pb2.Intervention] = (),
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    max_new_tokens: int = 0,
    stop: Sequence[str] = (),
    top_logprobs: int = 0,
    compare: bool = False,
    prompt_format: str = "",
    sampling: Mapping[str, Any] | None = None,
    roleplay: Mapping[str, Any] | None = None,
) -> generation_pb2.GenerateRequest:
    """Build a GenerateRequest (exactly one of prompt, messages, token_ids).

    ``sampling`` sets any other SamplingParams field by its name (``repetition_penalty``,
    ``dry_multiplier``, ``logit_bias={id: bias}``, ``banned_strings=[...]``, ...).
    ``roleplay`` is ``{"scene": {...}, "prompt_format": ..., "speaker": ..., "length": ...}``
    (the scene in the shape of recipes/data/rp_scenarios.jsonl), instead of a prompt; with
    ``"card": {...}`` (a SillyTavern card's JSON, :func:`steer.rp.cards.card_to_json`) the
    card is the scene's first character and the scene may leave characters out.
    """
    request = generation_pb2.GenerateRequest(
        model=model,
        interventions=list(interventions),
        max_new_tokens=max_new_tokens,
        stop=list(stop),
        top_logprobs=top_logprobs,
        compare=compare,
    )
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.prompt_format = prompt_format
        for item in messages:
            request.chat.messages.add(role=item["role"], content=item["content"])
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif roleplay is not None:
        request.roleplay.scene_json = json.dumps(roleplay.get("scene", {}))
        if roleplay.get("card") is not None:
            request.roleplay.card_json = json.dumps(roleplay["card"])
        request.roleplay.prompt_format = roleplay.get("prompt_format", "")
        request.roleplay.speaker = roleplay.get("speaker", "")
        request.roleplay.length = roleplay.get("length", "")
    for name, value in (
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("min_p", min_p),
    ):
        if value is not None:
            setattr(request.sampling, name, value)
    for name, value in (sampling or {}).items():
        if name == "logit_bias":
            request.sampling.logit_bias.update({int(k): float(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            getattr(request.sampling, name).extend(value)
        else:
            setattr(request.sampling, name, value)
    if seed is not None:
        request.seed = seed
    return request


def load_sae_request(
    path: str,
    sae_id: str = "",
    *,
    model: str = "",
    hook: str = "",
    allow_other_model: bool = False,
) -> features_pb2.LoadSaeRequest:
    """``path``: the SAE directory relative to the server's models root."""
    return features_pb2.LoadSaeRequest(
        path=path, sae_id=sae_id, model=model, hook=hook, allow_other_model=allow_other_model
    )


def feature_info_request(
    sae_id: str,
    feature: int,
    *,
    corpus: Sequence[str] = (),
    num_tokens: int = 0,
    num_snippets: int = 0,
    context_tokens: int = 0,
) -> features_pb2.FeatureInfoRequest:
    """Counts of 0 take the server's defaults (10 tokens, 5 snippets, 12 tokens of context)."""
    return features_pb2.FeatureInfoRequest(
        sae_id=sae_id,
        feature=feature,
        corpus=list(corpus),
        num_tokens=num_tokens,
        num_snippets=num_snippets,
        context_tokens=context_tokens,
    )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


# -- sync client ------------------------------------------------------------------------------


class SteerClient:
    """Blocking client. Every method raises a :mod:`steer.errors` class on failure."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = _channel_options(max_message_bytes)
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self.metadata = _metadata(token)
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._models = models_pb2_grpc.ModelsStub(self.channel)
        self._directions = directions_pb2_grpc.DirectionsStub(self.channel)
        self._bake = bake_services.BakeStub(self.channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self._features = features_pb2_grpc.FeaturesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise translate(error) from None

    # generation

    def generate(
        self, prompt: str | None = None, **options: Any
    ) -> Generator[GenerateEvent, None, None]:
        """Stream events; see :func:`generate_request` for the options. Closing the iterator
        early cancels the generation on the server."""
        yield from self.stream(generate_request(prompt, **options))

    def stream(
        self, request: generation_pb2.GenerateRequest
    ) -> Generator[GenerateEvent, None, None]:
        call = self._generation.Generate(request, timeout=self.timeout, metadata=self.metadata)
        try:
            for message in call:
                yield GenerateEvent.from_proto(message)
        except grpc.RpcError as error:
            raise translate(error) from None
        finally:
            call.cancel()

    def complete(self, prompt: str | None = None, **options: Any) -> dict[str | None, Completion]:
        """Generate to the end; one Completion per side (key None unless compare=True)."""
        completions: dict[str | None, Completion] = {}
        for event in self.generate(prompt, **options):
            completions.setdefault(event.side, Completion()).add(event)
        return completions

    # models

    def models(self) -> models_pb2.ListModelsResponse:
        return self._call(self._models.List, models_pb2.ListModelsRequest())

    def model_info(self, model_id: str = "") -> models_pb2.ModelInfo:
        return self._call(self._models.Info, models_pb2.ModelInfoRequest(model_id=model_id))

    def load_model(
        self, source: str, model_id: str = "", *, dtype: str = "", device: str = ""
    ) -> models_pb2.ModelInfo:
        request = models_pb2.LoadModelRequest(
            source=source, model_id=model_id, dtype=dtype, device=device
        )
        return self._call(self._models.Load, request)

    def unload_model(self, model_id: str) -> None:
        self._call(self._models.Unload, models_pb2.UnloadModelRequest(model_id=model_id))

    # artifacts

    def artifacts(self) -> list[directions_pb2.ArtifactInfo]:
        return list(self.list_artifacts().artifacts)

    def list_artifacts(self) -> directions_pb2.ListArtifactsResponse:
        """The artifacts that load (``artifacts``) and those that do not (``broken``)."""
        return self._call(self._directions.List, directions_pb2.ListArtifactsRequest())

    def artifact(self, artifact_id: str) -> directions_pb2.ArtifactInfo:
        return self._call(
            self._directions.Get, directions_pb2.GetArtifactRequest(artifact_id=artifact_id)
        )

    def upload_artifact(
        self, directory: str | Path, artifact_id: str | None = None, *, overwrite: bool = False
    ) -> directions_pb2.ArtifactInfo:
        """Upload a local steer vector artifact directory."""
        from steer.artifacts import SIDECAR, TENSORS

        directory = Path(directory)
        files = directions_pb2.ArtifactFiles(
            artifact_id=artifact_id or directory.name,
            vectors_safetensors=(directory / TENSORS).read_bytes(),
            steer_json=(directory / SIDECAR).read_bytes(),
        )
        request = directions_pb2.UploadArtifactRequest(files=files, overwrite=overwrite)
        return self._call(self._directions.Upload, request)

    def download_artifact(self, artifact_id: str, directory: str | Path) -> Path:
        """Download an artifact into ``directory`` (created)."""
        from steer.artifacts import SIDECAR, TENSORS

        files = self._call(
            self._directions.Download, directions_pb2.GetArtifactRequest(artifact_id=artifact_id)
        )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TENSORS).write_bytes(files.vectors_safetensors)
        (directory / SIDECAR).write_bytes(files.steer_json)
        return directory

    def delete_artifact(self, artifact_id: str) -> directions_pb2.DeleteArtifactResponse:
        """Remove an artifact from the server (a broken one too); NotFound if there is none."""
        request = directions_pb2.DeleteArtifactRequest(artifact_id=artifact_id)
        return self._call(self._directions.Delete, request)

    # SAEs and features

    def load_sae(self, path: str, sae_id: str = "", **options: Any) -> features_pb2.SaeInfo:
        """Load an SAE directory (relative to the server's models root) for a model; options:
        ``model``, ``hook``, ``allow_other_model`` (see :func:`load_sae_request`)."""
        return self._call(self._features.LoadSae, load_sae_request(path, sae_id, **options))

    def saes(self) -> list[features_pb2.SaeInfo]:
        return list(self._call(self._features.ListSaes, features_pb2.ListSaesRequest()).saes)

    def unload_sae(self, sae_id: str) -> None:
        self._call(self._features.UnloadSae, features_pb2.UnloadSaeRequest(sae_id=sae_id))

    def feature_activations(
        self, sae_id: str, text: str, *, k: int = 0, per_token: bool = False
    ) -> features_pb2.ActivationsResponse:
        """The top features of ``text`` (and with ``per_token`` each token's); k 0 = 10."""
        request = features_pb2.ActivationsRequest(
            sae_id=sae_id, text=text, k=k, per_token=per_token
        )
        return self._call(self._features.Activations, request)

    def search_features(
        self, sae_id: str, examples: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = features_pb2.SearchRequest(sae_id=sae_id, examples=list(examples), k=k)
        return list(self._call(self._features.Search, request).features)

    def contrast_features(
        self, sae_id: str, set_a: Sequence[str], set_b: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = features_pb2.ContrastRequest(
            sae_id=sae_id, set_a=list(set_a), set_b=list(set_b), k=k
        )
        return list(self._call(self._features.Contrast, request).features)

    def feature_info(self, sae_id: str, feature: int, **options: Any) -> features_pb2.FeatureInfo:
        """Options: ``corpus``, ``num_tokens``, ``num_snippets``, ``context_tokens``."""
        return self._call(self._features.Info, feature_info_request(sae_id, feature, **options))

    # jobs

    def compute_direction(
        self,
        recipe: str | Mapping[str, Any],
        artifact_id: str,
        *,
        model: str = "",
        overwrite: bool = False,
    ) -> jobs_pb2.Job:
        """Start a direction job. ``recipe``: TOML text, or a path under the server's root
        (a string ending in .toml)."""
        request = directions_pb2.ComputeDirectionRequest(
            model=model, artifact_id=artifact_id, overwrite=overwrite
        )
        _set_recipe(request, recipe)
        return self._call(self._directions.Compute, request)

    def bake(
        self,
        model_source: str,
        recipe: str | Mapping[str, Any],
        output: str,
        *,
        output_format: str = "model",
        overwrite: bool = False,
    ) -> jobs_pb2.Job:
        request = bake_messages.BakeRequest(
            model_source=model_source,
            output=output,
            output_format=output_format,
            overwrite=overwrite,
        )
        _set_recipe(request, recipe)
        return self._call(self._bake.Bake, request)

    def job(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.Get, jobs_pb2.JobRequest(job_id=job_id))

    def cancel_job(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.Cancel, jobs_pb2.JobRequest(job_id=job_id))

    def watch_job(self, job_id: str) -> Iterator[jobs_pb2.Job]:
        call = self._jobs.Watch(
            jobs_pb2.JobRequest(job_id=job_id), timeout=self.timeout, metadata=self.metadata
        )
        try:
            yield from call
        except grpc.RpcError as error:
            raise translate(error) from None

    # health

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... of the server (or one service); needs no token."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _set_recipe(request: Any, recipe: str | Mapping[str, Any]) -> None:
    if isinstance(recipe, Mapping):
        from steer.recipes import toml_text

        request.recipe_toml = toml_text(recipe)
    elif recipe.endswith(".toml") and "\n" not in recipe:
        request.recipe_path = recipe
    else:
        request.recipe_toml = recipe


# -- asyncio client ---------------------------------------------------------------------------


class AsyncSteerClient:
    """The asyncio client: the same generation, model and artifact calls, awaited."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options = _channel_options(max_message_bytes)
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.timeout = timeout
        self.metadata = _metadata(token)
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._models = models_pb2_grpc.ModelsStub(self.channel)
        self._directions = directions_pb2_grpc.DirectionsStub(self.channel)
        self._features = features_pb2_grpc.FeaturesStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSteerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise translate(error) from None

    async def generate(
        self, prompt: str | None = None, **options: Any
    ) -> AsyncIterator[GenerateEvent]:
        call = self._generation.Generate(
            generate_request(prompt, **options), timeout=self.timeout, metadata=self.metadata
        )
        try:
            async for message in call:
                yield GenerateEvent.from_proto(message)
        except grpc.RpcError as error:
            raise translate(error) from None
        finally:
            call.cancel()

    async def complete(
        self, prompt: str | None = None, **options: Any
    ) -> dict[str | None, Completion]:
        completions: dict[str | None, Completion] = {}
        async for event in self.generate(prompt, **options):
            completions.setdefault(event.side, Completion()).add(event)
        return completions

    async def models(self) -> models_pb2.ListModelsResponse:
        return await self._call(self._models.List, models_pb2.ListModelsRequest())

    async def model_info(self, model_id: str = "") -> models_pb2.ModelInfo:
        return await self._call(self._models.Info, models_pb2.ModelInfoRequest(model_id=model_id))

    async def artifacts(self) -> list[directions_pb2.ArtifactInfo]:
        response = await self._call(self._directions.List, directions_pb2.ListArtifactsRequest())
        return list(response.artifacts)

    async def load_sae(self, path: str, sae_id: str = "", **options: Any) -> features_pb2.SaeInfo:
        return await self._call(self._features.LoadSae, load_sae_request(path, sae_id, **options))

    async def saes(self) -> list[features_pb2.SaeInfo]:
        response = await self._call(self._features.ListSaes, features_pb2.ListSaesRequest())
        return list(response.saes)

    async def unload_sae(self, sae_id: str) -> None:
        await self._call(self._features.UnloadSae, features_pb2.UnloadSaeRequest(sae_id=sae_id))

    async def feature_activations(
        self, sae_id: str, text: str, *, k: int = 0, per_token: bool = False
    ) -> features_pb2.ActivationsResponse:
        request = features_pb2.ActivationsRequest(
            sae_id=sae_id, text=text, k=k, per_token=per_token
        )
        return await self._call(self._features.Activations, request)

    async def search_features(
        self, sae_id: str, examples: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = features_pb2.SearchRequest(sae_id=sae_id, examples=list(examples), k=k)
        return list((await self._call(self._features.Search, request)).features)

    async def contrast_features(
        self, sae_id: str, set_a: Sequence[str], set_b: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = features_pb2.ContrastRequest(
            sae_id=sae_id, set_a=list(set_a), set_b=list(set_b), k=k
        )
        return list((await self._call(self._features.Contrast, request)).features)

    async def feature_info(
        self, sae_id: str, feature: int, **options: Any
    ) -> features_pb2.FeatureInfo:
        request = feature_info_request(sae_id, feature, **options)
        return await self._call(self._features.Info, request)
