"""llama.cpp control vectors: export additive edits as a GGUF, import such a file as a vector.

Format (llama.cpp ``--control-vector``): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the model family), ``controlvector.layer_count``, and one float32
tensor ``direction.L`` of d_model values per layer, added to the output of layer L, i.e. at
``blocks.L.hook_resid_post``. llama.cpp never applies layer 0's entry, so it is refused here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from steer import digests
from steer.errors import InvalidArgumentError, NotFoundError
from steer.vectors import SteeringVector

ARCHITECTURE = "controlvector"
#: how the provenance's ``tensors`` digests are made: BLAKE3 of each tensor's float32 bytes
TENSOR_HASH = "blake3-float32"


def write_control_vector(
    path: Path, vector: SteeringVector, *, model_hint: str, provenance: dict | None = None
) -> None:
    """Write ``vector`` (per-layer, already scaled) as a llama.cpp control-vector GGUF."""
    import gguf

    if not vector.per_layer:
        raise InvalidArgumentError("a control vector needs per-layer vectors", field="vector")
    if 0 in vector.per_layer:
        raise InvalidArgumentError(
            "llama.cpp does not apply a control vector to layer 0; move the edit to a later layer",
            field="layers",
        )
    tensors = _tensors(vector)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.per_layer))
    if provenance is not None:
        record = {**provenance, "tensor_hash": TENSOR_HASH, "tensors": _digests(tensors)}
        writer.add_string("steer.provenance", json.dumps(record, default=str))
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(vector: SteeringVector) -> dict[str, np.ndarray]:
    """The file's tensors: ``direction.L`` -> float32 values, in layer order."""
    return {
        f"direction.{layer}": vector.at(layer).numpy().astype(np.float32) for layer in vector.layers
    }


def _digests(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: digests.new(values.tobytes()).hexdigest() for name, values in tensors.items()}


def verify_control_vector(path: str | Path) -> list[str]:
    """Re-hash a control vector's tensors against the digests its steer provenance records;
    return the problems (empty when every ``direction.L`` is as the bake wrote it)."""
    vector, metadata = read_control_vector(path)
    record = metadata.get("provenance")
    if not isinstance(record, dict):
        return ["no steer provenance: not written by steer bake, nothing to check against"]
    recorded = record.get("tensors")
    if record.get("tensor_hash") != TENSOR_HASH or not isinstance(recorded, dict):
        return ["its provenance records no tensor digests (baked by an older steer); bake again"]
    actual = _digests(_tensors(vector))
    problems = [f"missing: {name}" for name in sorted(set(recorded) - set(actual))]
    problems += [
        f"hash mismatch: {name}"
        for name in sorted(set(recorded) & set(actual))
        if recorded[name] != actual[name]
    ]
    problems += [f"not recorded: {name}" for name in sorted(set(actual) - set(recorded))]
    return problems


def read_control_vector(path: str | Path) -> tuple[SteeringVector, dict[str, object]]:
    """A control-vector GGUF as a steering vector (per layer, scale 1) and its metadata."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist", field="control_vector")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise InvalidArgumentError(
            f"{path} is not a GGUF file: {error}", field="control_vector"
        ) from None
    fields = {name: _field_value(reader, name) for name in reader.fields}
    if fields.get("general.architecture") != ARCHITECTURE:
        raise InvalidArgumentError(
            f"{path} has general.architecture {fields.get('general.architecture')!r}, not "
            f"{ARCHITECTURE!r}",
            field="control_vector",
        )
    per_layer = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        layer = int(tensor.name.removeprefix("direction."))
        per_layer[layer] = torch.tensor(np.asarray(tensor.data, dtype=np.float32).reshape(-1))
    if not per_layer:
        raise InvalidArgumentError(f"{path} has no direction.N tensors", field="control_vector")
    metadata = {
        "model_hint": fields.get(f"{ARCHITECTURE}.model_hint"),
        "layer_count": fields.get(f"{ARCHITECTURE}.layer_count"),
    }
    if "steer.provenance" in fields:
        metadata["provenance"] = json.loads(str(fields["steer.provenance"]))
    return SteeringVector(per_layer=per_layer, name=path.stem), metadata


def _field_value(reader, name: str) -> object:  # type: ignore[no-untyped-def]
    field = reader.fields[name]
    if not field.types:
        return None
    import gguf

    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    return field.parts[field.data[0]].tolist()[0]
