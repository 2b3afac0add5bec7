"""The blocking client, :class:`SteerClient`: every rpc of every service as a method."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from steer.client.calls import Connection, translate
from steer.client.messages import (
    activations_request,
    contrast_request,
    feature_info_request,
    generate_request,
    load_sae_request,
    search_request,
    set_recipe,
)
from steer.client.results import Completion, GenerateEvent
from steer.proto.v1 import bake_pb2 as bake_messages
from steer.proto.v1 import (
    directions_pb2,
    features_pb2,
    generation_pb2,
    jobs_pb2,
    models_pb2,
)


class SteerClient(Connection):
    """Blocking client. Every method raises a :mod:`steer.errors` class on failure."""

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
        request = activations_request(sae_id, text, k=k, per_token=per_token)
        return self._call(self._features.Activations, request)

    def search_features(
        self, sae_id: str, examples: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = search_request(sae_id, examples, k=k)
        return list(self._call(self._features.Search, request).features)

    def contrast_features(
        self, sae_id: str, set_a: Sequence[str], set_b: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = contrast_request(sae_id, set_a, set_b, k=k)
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
        set_recipe(request, recipe)
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
        set_recipe(request, recipe)
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
