"""The asyncio client, :class:`AsyncSteerClient`: generation, models, artifacts and features,
awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from steer.client.calls import Connection, translate
from steer.client.messages import (
    activations_request,
    contrast_request,
    feature_info_request,
    generate_request,
    load_sae_request,
    search_request,
)
from steer.client.results import Completion, GenerateEvent
from steer.proto.v1 import (
    directions_pb2,
    features_pb2,
    models_pb2,
)


class AsyncSteerClient(Connection):
    """The asyncio client: the same generation, model and artifact calls, awaited."""

    grpc_module = grpc.aio

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
        request = activations_request(sae_id, text, k=k, per_token=per_token)
        return await self._call(self._features.Activations, request)

    async def search_features(
        self, sae_id: str, examples: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = search_request(sae_id, examples, k=k)
        return list((await self._call(self._features.Search, request)).features)

    async def contrast_features(
        self, sae_id: str, set_a: Sequence[str], set_b: Sequence[str], *, k: int = 0
    ) -> list[features_pb2.RankedFeature]:
        request = contrast_request(sae_id, set_a, set_b, k=k)
        return list((await self._call(self._features.Contrast, request)).features)

    async def feature_info(
        self, sae_id: str, feature: int, **options: Any
    ) -> features_pb2.FeatureInfo:
        request = feature_info_request(sae_id, feature, **options)
        return await self._call(self._features.Info, request)
