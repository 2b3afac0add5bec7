"""Vector artifacts: a directory with ``vectors.safetensors`` and a ``steer.json`` sidecar.

Layout::

    my-direction/
      vectors.safetensors   tensors "layer.<L>" (d_model,) and/or "shared" (d_model,), float32
      steer.json            {"format": "steer.vector", "format_version": 1, "name", "kind",
                             "model": {"name", "architecture", "d_model", "num_layers",
                                       "weight_hash", "weight_hash_format"},
                             "hooks", "positions", "method", "data", "metrics",
                             "steer_version", ...}

Every save has a load; loading against a different model is an error unless asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.models import WEIGHT_HASH_FORMAT, ModelHandle, stale_weight_hash_hint
from steer.vectors import SteeringVector

FORMAT = "steer.vector"
FORMAT_VERSION = 1
TENSORS = "vectors.safetensors"
SIDECAR = "steer.json"


@dataclass(frozen=True, eq=False)
class VectorArtifact:
    vector: SteeringVector
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "vector"))


def model_identity(handle: ModelHandle) -> dict[str, Any]:
    return {
        "name": handle.name,
        "architecture": handle.architecture,
        "d_model": handle.d_model,
        "num_layers": handle.num_layers,
        "weight_hash": handle.weight_hash,
        "weight_hash_format": WEIGHT_HASH_FORMAT,
    }


def save_vector(
    path: str | Path,
    vector: SteeringVector,
    *,
    handle: ModelHandle | None = None,
    kind: str = "vector",
    **metadata: Any,
) -> Path:
    """Write ``vector`` and its sidecar to the directory ``path`` (created; files replaced)."""
    from steer import __version__

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{layer}": vec.contiguous() for layer, vec in vector.per_layer.items()}
    if vector.shared is not None:
        tensors["shared"] = vector.shared.contiguous()
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": vector.name,
        "kind": kind,
        "d_model": vector.d_model,
        "model": model_identity(handle) if handle is not None else None,
        "steer_version": __version__,
        **metadata,
    }
    temp_tensors = directory / (TENSORS + ".tmp")
    temp_sidecar = directory / (SIDECAR + ".tmp")
    save_file(tensors, str(temp_tensors), metadata={"format": FORMAT})
    temp_sidecar.write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
    os.replace(temp_tensors, directory / TENSORS)
    os.replace(temp_sidecar, directory / SIDECAR)
    return directory


def load_vector(
    path: str | Path, *, handle: ModelHandle | None = None, allow_other_model: bool = False
) -> VectorArtifact:
    """Read a vector artifact; with ``handle``, check it was made for that model."""
    directory = Path(path)
    if not (directory / SIDECAR).exists() or not (directory / TENSORS).exists():
        raise NotFoundError(f"{directory} is not a steer vector artifact", field="artifact")
    try:
        metadata = json.loads((directory / SIDECAR).read_text())
    except json.JSONDecodeError as error:
        raise InvalidArgumentError(f"{directory / SIDECAR}: {error}", field="artifact") from None
    if metadata.get("format") != FORMAT:
        raise InvalidArgumentError(
            f"{directory} has format {metadata.get('format')!r}", field="artifact"
        )
    try:
        tensors = load_file(str(directory / TENSORS))
    except (SafetensorError, OSError) as error:
        raise InvalidArgumentError(
            f"{directory / TENSORS} is corrupt: {error}", field="artifact"
        ) from None
    per_layer = {}
    for key, value in tensors.items():
        if key.startswith("layer."):
            per_layer[int(key.removeprefix("layer."))] = value.float()
        elif key != "shared":
            raise InvalidArgumentError(
                f"unexpected tensor {key!r} in {directory}", field="artifact"
            )
    vector = SteeringVector(
        per_layer=per_layer, shared=tensors.get("shared"), name=str(metadata.get("name", ""))
    )
    if handle is not None:
        check_model(metadata, handle, allow_other_model=allow_other_model, where=str(directory))
    return VectorArtifact(vector, metadata)


def check_model(
    metadata: Mapping[str, Any], handle: ModelHandle, *, allow_other_model: bool, where: str
) -> None:
    """Refuse an artifact made for another model (d_model always; weights unless allowed)."""
    d_model = metadata.get("d_model")
    if d_model is not None and int(d_model) != handle.d_model:
        raise InvalidArgumentError(
            f"{where} has d_model {d_model} but the model has {handle.d_model}", field="artifact"
        )
    model = metadata.get("model") or {}
    if allow_other_model or not model.get("weight_hash"):
        return
    if model["weight_hash"] != handle.weight_hash:
        raise FailedPreconditionError(
            f"{where} was made for model {model.get('name')!r} (weight hash "
            f"{model['weight_hash'][:12]}…), not the loaded {handle.name!r} "
            f"({handle.weight_hash[:12]}…){stale_weight_hash_hint(model)}; pass "
            "allow_other_model to use it anyway",
            field="artifact",
        )


def refresh_model_record(path: str | Path, handle: ModelHandle) -> str:
    """Bring an artifact's model record to the current weight-hash format.

    The recorded hash is checked against ``handle`` in the format it was made in; only if it
    matches is the record rewritten with the current format's hash (nothing else changes).
    Returns what was done; raises FailedPreconditionError when the artifact names other weights.
    """
    directory = Path(path)
    load_vector(directory, allow_other_model=True)  # a readable artifact, before any change
    sidecar = directory / SIDECAR
    metadata = json.loads(sidecar.read_text())
    model = metadata.get("model") or {}
    if not model.get("weight_hash"):
        raise FailedPreconditionError(
            f"{directory} names no model weights to refresh", field="artifact"
        )
    weight_format = int(model.get("weight_hash_format") or 1)
    if handle.weight_hash_in_format(weight_format) != model["weight_hash"]:
        raise FailedPreconditionError(
            f"{directory} was made for other weights (model {model.get('name')!r}, weight-hash "
            f"format {weight_format}) than {handle.name!r}",
            field="artifact",
        )
    if weight_format == WEIGHT_HASH_FORMAT:
        return f"{directory}: already weight-hash format {WEIGHT_HASH_FORMAT}"
    metadata["model"] = {**model, **model_identity(handle), "name": model.get("name", handle.name)}
    temp = directory / (SIDECAR + ".tmp")
    temp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    os.replace(temp, sidecar)
    return f"{directory}: weight-hash format {weight_format} -> {WEIGHT_HASH_FORMAT}"
