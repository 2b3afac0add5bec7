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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.hooks import resid_post_hooks
from steer.interventions import Ablate, Add, Phase
from steer.json_input import json_type, read_object
from steer.models import WEIGHT_HASH_FORMAT, ModelHandle, stale_weight_hash_hint
from steer.vectors import SteeringVector

FORMAT = "steer.vector"
FORMAT_VERSION = 1
TENSORS = "vectors.safetensors"
SIDECAR = "steer.json"


@dataclass(frozen=True, eq=False)
class VectorArtifact:
    """A loaded artifact; :meth:`addition` and :meth:`ablation` are the one way every caller
    (server, client, CLI, recipes, ``steer directions``) turns it into an intervention."""

    vector: SteeringVector
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "vector"))

    @property
    def hooks(self) -> tuple[str, ...]:
        """The hook names ``steer.json`` records (where a direction was read); may be empty."""
        return tuple(str(hook) for hook in self.metadata.get("hooks") or ())

    def addition(
        self,
        strength: float = 1.0,
        *,
        hooks: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        phase: Phase = Phase.ALL,
        speaker: str | None = None,
    ) -> Add:
        """Activation addition of the vector at ``strength``.

        Where, the first that applies: ``hooks``; ``blocks.L.hook_resid_post`` for each of
        ``layers``; the hooks the artifact records; ``blocks.L.hook_resid_post`` for each layer
        the vector has its own vector for (:class:`~steer.interventions.Add`'s default).
        """
        if hooks is None:
            hooks = self.hooks if layers is None else resid_post_hooks(layers)
        return Add(self.vector, strength, hooks=tuple(hooks), phase=phase, speaker=speaker)

    def ablation(
        self,
        weight: float = 1.0,
        *,
        layers: Sequence[int] | None = None,
        layer_weights: Mapping[int, float] | None = None,
        speaker: str | None = None,
    ) -> Ablate:
        """Directional ablation of the vector; see :func:`ablation`."""
        return ablation(
            self.vector, weight, layers=layers, layer_weights=layer_weights, speaker=speaker
        )


def ablation(
    direction: SteeringVector,
    weight: float = 1.0,
    *,
    layers: Sequence[int] | None = None,
    layer_weights: Mapping[int, float] | None = None,
    speaker: str | None = None,
) -> Ablate:
    """Directional ablation of ``direction`` on ``layers``; without them, on the layers a
    per-layer direction has vectors for, or every layer for a shared one."""
    if layers is None and direction.shared is None:
        layers = direction.layers
    return Ablate(
        direction,
        layers=None if layers is None else tuple(layers),
        weight=weight,
        layer_weights=layer_weights,
        speaker=speaker,
    )


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
    path: str | Path,
    *,
    handle: ModelHandle | None = None,
    allow_other_model: bool = False,
    where: str | None = None,
) -> VectorArtifact:
    """Read a vector artifact; with ``handle``, check it was made for that model.

    Everything is checked before anything is returned: ``steer.json`` is a JSON object whose keys
    have their types, the tensors are named ``layer.<L>`` or ``shared`` and hold float vectors
    of the width the sidecar records. A bad artifact raises :class:`InvalidArgumentError` whose
    field names the file (``steer_json.model``, ``vectors_safetensors``). ``where`` is how
    messages name the directory (default: its path); files inside it are named relative to it.
    """
    directory = Path(path)
    where = where or str(directory)
    if not (directory / SIDECAR).exists() or not (directory / TENSORS).exists():
        raise NotFoundError(
            f"{where} is not a steer vector artifact ({SIDECAR} or {TENSORS} is missing)",
            field="artifact",
        )
    metadata = _read_sidecar(directory, where)
    vector = _read_vector(directory, where, name=metadata.get("name") or "")
    d_model = metadata.get("d_model")
    if d_model is not None and d_model != vector.d_model:
        raise InvalidArgumentError(
            f"{where}: {SIDECAR} records d_model {d_model} but the vectors in {TENSORS} have "
            f"{vector.d_model}",
            field="steer_json.d_model",
        )
    if handle is not None:
        check_model(metadata, handle, allow_other_model=allow_other_model, where=where)
    return VectorArtifact(vector, metadata)


#: steer.json keys steer reads, and the type each must have when present (null = absent);
#: d_model and the model record are :func:`check_model_record`'s
_SIDECAR_TYPES: dict[str, type] = {
    "format": str,
    "format_version": int,
    "name": str,
    "kind": str,
    "hooks": list,
    "metrics": dict,
    "notes": list,
}
#: the keys of its "model" record (see :func:`model_identity`)
_MODEL_TYPES: dict[str, type] = {
    "name": str,
    "architecture": str,
    "d_model": int,
    "num_layers": int,
    "weight_hash": str,
    "weight_hash_format": int,
}
_LAYER_TENSOR = re.compile(r"layer\.(0|[1-9][0-9]{0,5})")


def _read_sidecar(directory: Path, where: str) -> dict[str, Any]:
    metadata = read_object(directory / SIDECAR, what=f"{where}: {SIDECAR}", field="steer_json")
    if metadata.get("format") != FORMAT:
        raise InvalidArgumentError(
            f"{where}: {SIDECAR} has format {metadata.get('format')!r}, not {FORMAT!r}",
            field="steer_json.format",
        )
    check_types(metadata, _SIDECAR_TYPES, what=f"{where}: {SIDECAR}", field="steer_json")
    check_model_record(metadata, what=f"{where}: {SIDECAR}", field="steer_json")
    hooks = metadata.get("hooks") or []
    if not all(isinstance(hook, str) for hook in hooks):
        raise InvalidArgumentError(
            f"{where}: {SIDECAR} key 'hooks' must be a list of hook names (strings)",
            field="steer_json.hooks",
        )
    return metadata


def check_types(
    values: Mapping[str, Any], types: Mapping[str, type], *, what: str, field: str
) -> None:
    """Raise unless each key of ``types`` in ``values`` is null/absent or of its type."""
    for key, expected in types.items():
        value = values.get(key)
        wrong = not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        if value is not None and wrong:
            raise InvalidArgumentError(
                f"{what} key {key!r} must be {json_type(expected())}, not {json_type(value)}",
                field=f"{field}.{key}",
            )


def check_model_record(metadata: Mapping[str, Any], *, what: str, field: str) -> None:
    """Raise unless a sidecar's ``d_model`` and ``model`` record have the types steer reads."""
    check_types(metadata, {"d_model": int, "model": dict}, what=what, field=field)
    model = metadata.get("model") or {}
    check_types(model, _MODEL_TYPES, what=f"{what} 'model' record", field=f"{field}.model")


def _read_vector(directory: Path, where: str, *, name: str) -> SteeringVector:
    try:
        tensors = load_file(str(directory / TENSORS))
    except (SafetensorError, OSError) as error:
        raise InvalidArgumentError(
            f"{where}: {TENSORS} is not a safetensors file ({error})", field="vectors_safetensors"
        ) from None
    per_layer, shared = {}, None
    for key, value in tensors.items():
        match = _LAYER_TENSOR.fullmatch(key)
        if key != "shared" and match is None:
            raise InvalidArgumentError(
                f"{where}: unexpected tensor {key!r} in {TENSORS}; expected 'layer.<L>' "
                "(L a layer number) or 'shared'",
                field="vectors_safetensors",
            )
        if not value.is_floating_point():
            raise InvalidArgumentError(
                f"{where}: tensor {key!r} in {TENSORS} has dtype {value.dtype}, not floats",
                field="vectors_safetensors",
            )
        if match is None:
            shared = value.float()
        else:
            per_layer[int(match[1])] = value.float()
    try:
        return SteeringVector(per_layer=per_layer, shared=shared, name=name)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(
            f"{where}: {TENSORS}: {error.message}", field="vectors_safetensors"
        ) from None


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
    # a readable artifact, before any change
    metadata = dict(load_vector(directory, allow_other_model=True).metadata)
    sidecar = directory / SIDECAR
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
