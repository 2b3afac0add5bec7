"""Loaded SAEs by id, each bound to the model it was loaded (and checked) for.

An SAE is a SAELens directory under the models root (confined like model and recipe paths) and
is loaded with :func:`steer.sae.load_sae` against its model's handle, so the hook point, d_in
and a sidecar's weight hash are checked by the library, not here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from steer.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError, SteerError
from steer.models import ModelHandle
from steer.service.paths import check_id, confine, root_hidden
from steer.service.registry import LoadedModel
from steer.service.scheduler import in_short_thread

if TYPE_CHECKING:  # steer.sae imports SAELens, which the server loads only once an SAE is used
    from steer.sae import SparseAutoencoder


@dataclass(frozen=True, eq=False)
class LoadedSae:
    sae_id: str
    #: id of the model it was loaded for, and that model's handle (identity, not equality:
    #: a model unloaded and loaded again under the same id is another model)
    model_id: str
    handle: ModelHandle
    #: its directory relative to the models root
    path: str
    sae: SparseAutoencoder

    def check_model(self, handle: ModelHandle, model_id: str, *, field: str) -> None:
        """Raise unless this SAE was loaded for ``handle``."""
        if handle is not self.handle:
            raise FailedPreconditionError(
                f"SAE {self.sae_id!r} was loaded for model {self.model_id!r}, not {model_id!r}; "
                f"load it for {model_id!r} under another id",
                field=field,
            )


class SaeRegistry:
    def __init__(self, models_root: Path) -> None:
        self.models_root = models_root
        self._saes: dict[str, LoadedSae] = {}
        self._lock = threading.Lock()

    def load(
        self,
        model: LoadedModel,
        path: str,
        sae_id: str = "",
        *,
        hook: str = "",
        allow_other_model: bool = False,
    ) -> LoadedSae:
        """Load the SAE directory ``path`` (relative to the models root) for ``model``."""
        directory = confine(self.models_root, path, field="path")
        sae_id = sae_id or directory.name
        check_id(sae_id, field="sae_id")
        with self._lock:
            if sae_id in self._saes:
                raise _taken(sae_id)
        from steer.sae import load_sae

        relative = str(directory.relative_to(self.models_root.resolve()))
        try:
            with root_hidden(self.models_root):
                sae = in_short_thread(  # torch work off the handler thread (see in_short_thread)
                    lambda: load_sae(
                        directory,
                        model.handle,
                        hook=hook or None,
                        allow_other_model=allow_other_model,
                        where=relative,
                    )
                )
        except SteerError as error:
            if error.field == "sae":  # the directory itself: name the request's field
                error.field = "path"
            raise
        loaded = LoadedSae(sae_id, model.model_id, model.handle, relative, sae)
        with self._lock:
            if sae_id in self._saes:
                raise _taken(sae_id)
            self._saes[sae_id] = loaded
        return loaded

    def get(self, sae_id: str, *, field: str = "sae_id") -> LoadedSae:
        with self._lock:
            loaded = self._saes.get(sae_id)
            known = ", ".join(sorted(self._saes)) or "none"
        if loaded is None:
            raise NotFoundError(
                f"SAE {sae_id!r} is not loaded (Features.LoadSae); loaded: {known}", field=field
            )
        return loaded

    def unload(self, sae_id: str) -> None:
        with self._lock:
            if self._saes.pop(sae_id, None) is None:
                raise NotFoundError(f"SAE {sae_id!r} is not loaded", field="sae_id")

    def forget_model(self, handle: ModelHandle) -> None:
        """Drop the SAEs of an unloaded model (they hold its handle, which keeps it in memory)."""
        with self._lock:
            for sae_id in [i for i, s in self._saes.items() if s.handle is handle]:
                del self._saes[sae_id]

    def all(self) -> list[LoadedSae]:
        with self._lock:
            return [self._saes[sae_id] for sae_id in sorted(self._saes)]


def _taken(sae_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(f"an SAE {sae_id!r} is already loaded", field="sae_id")
