"""One class per proto service. Each method: request -> domain objects -> engine -> response.

Methods raise domain exceptions only; :func:`steer.server.status.guard` turns them into status
codes. Directions.Compute and Bake import their library lazily, so the server starts without them
and answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from steer.errors import (
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from steer.proto.v1 import (
    directions_pb2,
    features_pb2,
    generation_pb2,
    jobs_pb2,
    models_pb2,
)
from steer.server.status import inline
from steer.service import convert
from steer.service.core import ServiceCore
from steer.service.job_work import ModelRef, bake, compute_direction, library
from steer.service.jobs import Jobs
from steer.service.paths import check_id, confine, confine_recipe, root_hidden
from steer.service.registry import LoadedModel, ModelRegistry
from steer.service.saes import LoadedSae, SaeRegistry
from steer.service.settings import ServerSettings
from steer.service.store import ArtifactStore
from steer.toml_input import parse_toml


class GenerationServicer:
    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        (plan,), subscription = await self.core.start_generation([request])
        try:  # a client that goes away cancels this coroutine; its rows go at the next step
            async for index, event in subscription:
                yield convert.generate_response(event, plan.sides[index])
        finally:
            subscription.cancel()


class ModelsServicer:
    def __init__(self, core: ServiceCore) -> None:
        self.registry, self.saes, self.sliders = core.registry, core.saes, core.sliders

    @inline
    def ListSliders(
        self, request: models_pb2.ListSlidersRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListSlidersResponse:
        return models_pb2.ListSlidersResponse(
            sliders=[convert.slider_info(s) for _, s in sorted(self.sliders.sliders.items())]
        )

    @inline
    def List(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            models=[convert.model_info(m, detailed=False) for m in self.registry.all().values()],
            default_model=self.registry.default_model,
        )

    def Load(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        loaded = self.registry.load(request.source, request.model_id, request.dtype, request.device)
        return convert.model_info(loaded, detailed=True)

    def Unload(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        unloaded = self.registry.unload(request.model_id)
        self.saes.forget_model(unloaded.handle)
        return models_pb2.UnloadModelResponse()

    @inline
    def Info(
        self, request: models_pb2.ModelInfoRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        return convert.model_info(self.registry.get(request.model_id), detailed=True)


class FeaturesServicer:
    """SAEs by id, and feature reads through :mod:`steer.sae.features`.

    The library calls run on the model's engine thread between two steps
    (:meth:`~steer.service.scheduler.ModelWorker.call`): their hooks attach to the modules the
    running batch's forward passes use. The handler coroutine awaits the result (no thread
    waits); a client that goes away before its call starts takes the call off the queue.
    """

    def __init__(self, registry: ModelRegistry, saes: SaeRegistry, settings: ServerSettings):
        self.registry, self.saes, self.settings = registry, saes, settings

    def LoadSae(
        self, request: features_pb2.LoadSaeRequest, context: grpc.ServicerContext
    ) -> features_pb2.SaeInfo:
        model = self.registry.get(request.model)
        loaded = self.saes.load(
            model,
            request.path,
            request.sae_id,
            hook=request.hook,
            allow_other_model=request.allow_other_model,
        )
        return convert.sae_info(loaded)

    def ListSaes(
        self, request: features_pb2.ListSaesRequest, context: grpc.ServicerContext
    ) -> features_pb2.ListSaesResponse:
        return features_pb2.ListSaesResponse(saes=[convert.sae_info(s) for s in self.saes.all()])

    def UnloadSae(
        self, request: features_pb2.UnloadSaeRequest, context: grpc.ServicerContext
    ) -> features_pb2.UnloadSaeResponse:
        self.saes.unload(request.sae_id)
        return features_pb2.UnloadSaeResponse()

    async def Activations(
        self, request: features_pb2.ActivationsRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.ActivationsResponse:
        from steer.sae.features import encode_texts, top_features

        entry = self.saes.get(request.sae_id)
        (text,) = await self._texts(entry, [request.text], "text")
        k = request.k or convert.DEFAULT_FEATURES

        def read() -> features_pb2.ActivationsResponse:
            top = top_features(entry.handle, entry.sae, text, k)
            encoded = None
            if request.per_token:
                (encoded,) = encode_texts(entry.handle, entry.sae, [text], field_name="text")
            return convert.activations_response(top, encoded, k)

        return await self._on_model(entry, read)

    async def Search(
        self, request: features_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.RankedFeatures:
        from steer.sae.features import search

        entry = self.saes.get(request.sae_id)
        examples = await self._texts(entry, request.examples, "examples")
        k = request.k or convert.DEFAULT_FEATURES
        return await self._on_model(
            entry, lambda: convert.ranked_features(search(entry.handle, entry.sae, examples, k))
        )

    async def Contrast(
        self, request: features_pb2.ContrastRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.RankedFeatures:
        from steer.sae.features import contrast

        entry = self.saes.get(request.sae_id)
        set_a = await self._texts(entry, request.set_a, "set_a")
        set_b = await self._texts(entry, request.set_b, "set_b")
        k = request.k or convert.DEFAULT_FEATURES
        return await self._on_model(
            entry,
            lambda: convert.ranked_features(contrast(entry.handle, entry.sae, set_a, set_b, k)),
        )

    async def Info(
        self, request: features_pb2.FeatureInfoRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureInfo:
        from steer.sae.features import feature_info

        entry = self.saes.get(request.sae_id)
        corpus = await self._texts(entry, request.corpus, "corpus")
        # unset (0) counts take the library's defaults
        counts = {
            name: getattr(request, name)
            for name in ("num_tokens", "num_snippets", "context_tokens")
            if getattr(request, name)
        }

        def read() -> features_pb2.FeatureInfo:
            info = feature_info(entry.handle, entry.sae, request.feature, corpus=corpus, **counts)
            return convert.feature_info(info)

        return await self._on_model(entry, read)

    async def _texts(self, entry: LoadedSae, values: Sequence[str], field: str) -> list[str]:
        """The request's texts within the server's limits (tokenised in a thread)."""
        return await asyncio.to_thread(convert.texts, values, entry.handle, self.settings, field)

    async def _on_model(self, entry: LoadedSae, read: Callable[[], Any]) -> Any:
        """Run ``read`` on the engine thread of the SAE's model and await its result; a client
        that goes away before the call starts takes it off the queue."""
        model = self.registry.get(entry.model_id)
        entry.check_model(model.handle, model.model_id, field="sae_id")
        future = model.worker.call(read)
        try:
            return await asyncio.wrap_future(future)
        except concurrent.futures.CancelledError:
            raise CancelledError("cancelled before it ran") from None


def _recipe(message: Any, settings: ServerSettings) -> dict[str, Any]:
    """A recipe given as TOML text or as a file under the models root, as a dict whose file
    references are confined to the models root (see :func:`confine_recipe`)."""
    root = settings.models_root
    which = message.WhichOneof("recipe")
    if which is None:
        raise InvalidArgumentError("set recipe_toml or recipe_path", field="recipe")
    if which == "recipe_path":
        path = confine(root, message.recipe_path, field="recipe_path")
        text, base, field = _recipe_text(path, message.recipe_path), path.parent, "recipe_path"
    else:
        text, base, field = message.recipe_toml, root, "recipe_toml"
    return confine_recipe(_parse_recipe(text, field), root, base, settings.artifacts_dir)


def _refuse_gates(recipe: dict[str, Any]) -> None:
    """Weights cannot hold a gate, and the Bake RPC has no switch to drop one: refuse at once
    rather than as a job that fails later."""
    edits = recipe.get("edits")
    for index, edit in enumerate(edits if isinstance(edits, list) else []):
        if isinstance(edit, dict) and "gate" in edit:
            raise InvalidArgumentError(
                "weights cannot hold a gate: apply a gated recipe at run time, or bake its "
                "ungated edit locally with steer bake --ungated",
                field=f"recipe.edits[{index}].gate",
            )


#: a recipe is a page of TOML; these bound what parsing one may cost (tomllib keeps every prefix
#: of a dotted key: one key of 10,000 parts, 20 KB of text, takes 400 MB)
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_DOTS = 4096


def _recipe_text(path: Path, relative: str) -> str:
    """The text of the recipe file ``path`` (``relative`` as the request named it)."""
    if not path.is_file():
        raise InvalidArgumentError(f"{relative!r} is not a file", field="recipe_path")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise InvalidArgumentError(
            f"{relative!r} is larger than a recipe may be ({MAX_RECIPE_BYTES} bytes)",
            field="recipe_path",
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(
            f"{relative!r} is not UTF-8 text (byte {error.start})", field="recipe_path"
        ) from None
    except OSError as error:
        raise InvalidArgumentError(
            f"{relative!r} cannot be read ({error.strerror})", field="recipe_path"
        ) from None


def _parse_recipe(text: str, field: str) -> dict[str, Any]:
    if len(text) > MAX_RECIPE_BYTES or text.count(".") > MAX_RECIPE_DOTS:
        raise InvalidArgumentError(
            f"a recipe has at most {MAX_RECIPE_BYTES} characters and {MAX_RECIPE_DOTS} dots",
            field=field,
        )
    return parse_toml(text, what="not valid TOML", field=field)


def _dtype_name(loaded: LoadedModel) -> str:
    return str(loaded.handle.dtype).removeprefix("torch.")


class DirectionsServicer:
    def __init__(
        self,
        registry: ModelRegistry,
        store: ArtifactStore,
        jobs: Jobs,
        settings: ServerSettings,
    ) -> None:
        self.registry, self.store, self.jobs, self.settings = registry, store, jobs, settings

    def Compute(
        self, request: directions_pb2.ComputeDirectionRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        library("steer.directions.api", "direction computation")  # refused now, not in the job
        loaded = self.registry.get(request.model)
        recipe = _recipe(request, self.settings)
        target = self.store.path(request.artifact_id)
        if target.exists() and not request.overwrite:
            raise AlreadyExistsError(
                f"artifact {request.artifact_id!r} exists; set overwrite", field="artifact_id"
            )
        # a job that runs elsewhere (a Ray task) loads the model itself
        model = ModelRef(loaded.source, _dtype_name(loaded)) if self.jobs.remote else loaded.handle
        work = functools.partial(
            compute_direction,
            model=model,
            recipe=recipe,
            target=target,
            models_root=self.settings.models_root,
        )
        return convert.job(self.jobs.start("directions", work))

    def List(
        self, request: directions_pb2.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ListArtifactsResponse:
        response = directions_pb2.ListArtifactsResponse()
        for artifact_id in self.store.ids():
            try:
                artifact = self.store.load(artifact_id)
            except NotFoundError:
                continue  # removed since it was listed
            except FailedPreconditionError as error:  # one broken directory hides no others
                response.broken.append(convert.broken_artifact(artifact_id, error.message))
                continue
            response.artifacts.append(
                convert.artifact_info(artifact_id, self.store.describe(artifact))
            )
        return response

    def Get(
        self, request: directions_pb2.GetArtifactRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ArtifactInfo:
        artifact = self.store.load(request.artifact_id)
        return convert.artifact_info(request.artifact_id, self.store.describe(artifact))

    def Upload(
        self, request: directions_pb2.UploadArtifactRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ArtifactInfo:
        files = convert.artifact_files(request.files)
        artifact = self.store.upload(files, overwrite=request.overwrite)
        return convert.artifact_info(files.artifact_id, self.store.describe(artifact))

    def Download(
        self, request: directions_pb2.GetArtifactRequest, context: grpc.ServicerContext
    ) -> directions_pb2.ArtifactFiles:
        return convert.artifact_files_message(self.store.files(request.artifact_id))

    def Delete(
        self, request: directions_pb2.DeleteArtifactRequest, context: grpc.ServicerContext
    ) -> directions_pb2.DeleteArtifactResponse:
        was_broken = self.store.delete(request.artifact_id)
        return directions_pb2.DeleteArtifactResponse(
            artifact_id=request.artifact_id, was_broken=was_broken
        )


class BakeServicer:
    """Bakes as jobs. The output rule (:func:`steer.bake.api.check_output`) runs when the
    request arrives, so an existing or forbidden output is refused with its status code, and
    again in the job: an output is a new path strictly below the models root that holds none of
    what the server keeps (the artifact store, loaded SAEs and models, the bake source), and
    ``overwrite`` replaces only a previous bake output."""

    def __init__(
        self, jobs: Jobs, settings: ServerSettings, registry: ModelRegistry, saes: SaeRegistry
    ) -> None:
        self.jobs, self.settings, self.registry, self.saes = jobs, settings, registry, saes

    def Bake(self, request: Any, context: grpc.ServicerContext) -> jobs_pb2.Job:
        api = library("steer.bake.api", "baking")
        root = self.settings.models_root
        with root_hidden(root):
            source = self._source(request.model_source)
            recipe = _recipe(request, self.settings)
            _refuse_gates(recipe)
            if not request.output:
                raise InvalidArgumentError("required", field="output")
            output = confine(root, request.output, field="output", must_exist=False)
            check_id(output.name, field="output")
            rules = {
                "root": root,
                "keep": self._kept(source),
                "reserved": (self.settings.artifacts_dir,),
            }
            output_format = request.output_format or "model"
            api.check_output(
                output,
                output_format=output_format,
                overwrite=request.overwrite,
                field="output",
                **rules,
            )

        work = functools.partial(
            bake,
            source=source,
            recipe=recipe,
            output=output,
            options={"output_format": output_format, "overwrite": request.overwrite, **rules},
            models_root=root,
        )
        return convert.job(self.jobs.start("bake", work))

    def _source(self, model_source: str) -> str:
        from steer.offline import OFFLINE_MODELS

        if model_source in OFFLINE_MODELS:
            return model_source
        return str(confine(self.settings.models_root, model_source, field="model_source"))

    def _kept(self, bake_source: str) -> list[Path]:
        """What no bake output may replace or contain: the artifact store, the directories of
        loaded SAEs, the sources of loaded models and the bake's own source (offline models
        live outside the root, and locating one may assemble it: not done on this thread)."""
        from steer.offline import OFFLINE_MODELS

        root = self.settings.models_root
        sources = [loaded.source for loaded in self.registry.all().values()]
        return [
            self.settings.artifacts_dir,
            *(root / sae.path for sae in self.saes.all()),
            *(root / source for source in [*sources, bake_source] if source not in OFFLINE_MODELS),
        ]


class JobsServicer:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def Get(self, request: jobs_pb2.JobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return convert.job(self.jobs.get(request.job_id))

    async def Watch(
        self, request: jobs_pb2.JobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for snapshot in self.jobs.watch_async(request.job_id):
            yield convert.job(snapshot)

    def Cancel(self, request: jobs_pb2.JobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return convert.job(self.jobs.cancel(request.job_id))

    def List(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[convert.job(s) for s in self.jobs.list()])
