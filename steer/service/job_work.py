"""The work of the service's jobs (direction computes, bakes) as plain functions of plain data.

A job's work is ``functools.partial(function, **arguments)``: every argument is a path, a
string, a parsed recipe or a :class:`ModelRef`, so the same work runs on the server's job thread
or, in a cluster, in a Ray task on another process or node (:mod:`steer.cluster.jobs`), which
loads the model itself instead of borrowing the serving replica's copy and cores.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import UnimplementedError
from steer.models import ModelHandle
from steer.service.paths import confine, hide_root, root_hidden

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ModelRef:
    """A model a job loads for itself: an offline name or a path under the models root."""

    source: str
    dtype: str = "float32"

    def load(self, models_root: Path) -> ModelHandle:
        from steer.models import load_model
        from steer.offline import OFFLINE_MODELS

        if self.source in OFFLINE_MODELS:
            location: str | Path = self.source
        else:
            location = confine(models_root, self.source, field="source")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        with root_hidden(models_root):
            return load_model(location, dtype=self.dtype, device=device)


def library(module: str, feature: str) -> Any:
    """Import a library module a job needs, or say plainly that this server lacks it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UnimplementedError(
            f"{feature} is not available on this server ({module} could not be imported: {error})"
        ) from None


def sidecar_json(directory: Path) -> str:
    """The provenance (bake) or steer.json (artifact) of an output, as text."""
    for name in ("provenance.json", "steer.json"):
        if (directory / name).is_file():
            return (directory / name).read_text()
    return json.dumps({"path": str(directory)})


def compute_direction(
    progress: Progress,
    cancelled: threading.Event,
    *,
    model: ModelHandle | ModelRef,
    recipe: dict[str, Any],
    target: Path,
    models_root: Path,
) -> tuple[str, str]:
    """Compute the artifact ``recipe`` describes into ``target``; (artifact id, its steer.json)."""
    from steer.service.store import ArtifactStore

    api = library("steer.directions.api", "direction computation")
    if isinstance(model, ModelRef):
        progress("loading the model", 0.0)
        model = model.load(models_root)
    with root_hidden(models_root):  # the library names the absolute paths the recipe now has
        out = Path(api.compute(model, recipe, target, progress=progress, cancelled=cancelled))
    ArtifactStore(target.parent).hide_paths(out, models_root)
    return out.name, hide_root(sidecar_json(out), models_root)


def bake(
    progress: Progress,
    cancelled: threading.Event,
    *,
    source: str,
    recipe: dict[str, Any],
    output: Path,
    options: dict[str, Any],
    models_root: Path,
) -> tuple[str, str]:
    """Bake ``recipe`` into ``source``'s weights at ``output``; (its path under the root, its
    provenance). ``options`` are :func:`steer.bake.api.bake`'s keywords (format, overwrite and
    the paths no output may replace)."""
    api = library("steer.bake.api", "baking")
    with root_hidden(models_root):
        out = Path(
            api.bake(source, recipe, output, progress=progress, cancelled=cancelled, **options)
        )
    relative = str(out.resolve().relative_to(models_root.resolve()))
    return relative, hide_root(sidecar_json(out), models_root)
