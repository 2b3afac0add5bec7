"""Loaded models by id, each with its :class:`~steer.service.scheduler.ModelWorker`."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from steer.backends import engine_factory
from steer.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SteerError,
)
from steer.models import ModelHandle, load_model
from steer.offline import OFFLINE_MODELS
from steer.service.paths import check_id, confine, root_hidden
from steer.service.scheduler import ModelWorker, in_short_thread
from steer.service.settings import ServerSettings


@dataclass(frozen=True, eq=False)
class LoadedModel:
    model_id: str
    source: str
    handle: ModelHandle
    worker: ModelWorker
    #: the generation backend its worker runs ("hf" or "vllm")
    backend: str = "hf"


def _vllm_options(settings: ServerSettings) -> Any:
    if settings.backend != "vllm":
        return None
    from steer.backends.vllm import VllmOptions

    return VllmOptions(
        tensor_parallel_size=settings.tensor_parallel_size,
        kv_cache_gib=settings.kv_cache_gib,
        max_model_len=settings.max_prompt_tokens + settings.max_new_tokens_cap,
    )


class ModelRegistry:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self.default_model = ""

    def add(self, model_id: str, handle: ModelHandle, source: str = "") -> LoadedModel:
        check_id(model_id, field="model_id")
        # hashed now, off this thread (see in_short_thread), rather than by the first Info call
        in_short_thread(lambda: handle.weight_hash)
        settings = self.settings
        factory = in_short_thread(
            lambda: engine_factory(
                handle,
                settings.backend,
                max_batch=settings.max_batch,
                max_waiting=settings.max_waiting,
                vllm_options=_vllm_options(settings),
            )
        )
        worker = ModelWorker(
            handle,
            max_batch=settings.max_batch,
            max_waiting=settings.max_waiting,
            max_prompt_tokens=settings.max_prompt_tokens,
            admission_window=settings.admission_window,
            engine_factory=factory,
        )
        loaded = LoadedModel(model_id, source or handle.name, handle, worker, settings.backend)
        with self._lock:
            if model_id in self._models:
                worker.close(0)
                raise AlreadyExistsError(
                    f"a model {model_id!r} is already loaded", field="model_id"
                )
            self._models[model_id] = loaded
            if not self.default_model:
                self.default_model = model_id
        return loaded

    def load(
        self, source: str, model_id: str = "", dtype: str = "", device: str = ""
    ) -> LoadedModel:
        """Load an offline model by name, or a model under the models root."""
        if not source:
            raise InvalidArgumentError("name an offline model or a path", field="source")
        model_id = model_id or Path(source).name
        check_id(model_id, field="model_id")
        with self._lock:
            if model_id in self._models:
                raise AlreadyExistsError(
                    f"a model {model_id!r} is already loaded", field="model_id"
                )
        if source in OFFLINE_MODELS:
            location: str | Path = source
        else:
            location = confine(self.settings.models_root, source, field="source")
        with root_hidden(self.settings.models_root):
            try:
                handle = in_short_thread(
                    lambda: load_model(location, dtype=dtype or "float32", device=device or "cpu")
                )
            except SteerError as error:
                if error.field == "model":
                    error.field = "source"  # the request's name for what could not be loaded
                raise
        # named as the client named it, not by its absolute path on this server (the name
        # appears in errors and in the artifacts computed with it)
        return self.add(model_id, replace(handle, name=source), source)

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            key = model_id or self.default_model
            if not key:
                raise FailedPreconditionError("no model is loaded; call Models.Load", field="model")
            loaded = self._models.get(key)
            if loaded is None:
                raise NotFoundError(
                    f"model {key!r} is not loaded; loaded: {', '.join(self._models) or 'none'}",
                    field="model",
                )
            return loaded

    def unload(self, model_id: str, grace: float = 0.0) -> LoadedModel:
        with self._lock:
            loaded = self._models.pop(model_id, None)
            if loaded is None:
                raise NotFoundError(f"model {model_id!r} is not loaded", field="model_id")
            if self.default_model == model_id:
                self.default_model = next(iter(self._models), "")
        loaded.worker.close(grace)
        return loaded

    def all(self) -> Mapping[str, LoadedModel]:
        with self._lock:
            return dict(self._models)

    def close(self, grace: float) -> None:
        workers = [loaded.worker for loaded in self.all().values()]
        threads = [threading.Thread(target=w.close, args=(grace,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
