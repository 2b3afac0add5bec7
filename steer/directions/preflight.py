"""Checks that need no model: run before loading one, so a bad recipe fails in a second.

Loading a model takes 20-100 s; ``steer directions compute`` used to load first and only then
find a missing data file or a layer out of range. :func:`check_recipe` reads every data set the
recipe names (the same readers the computation uses), checks the layers against the model's
layer count read from its ``config.json`` or GGUF header (:func:`layer_count`), and refuses an
output path that is a file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

from steer.directions import data as datasets
from steer.directions.recipe import GATE_SETS, DirectionRecipe, RecipeKind
from steer.errors import InvalidArgumentError, NotFoundError
from steer.offline import OFFLINE_MODELS, resolve_offline


def check_recipe(
    recipe: DirectionRecipe, *, model: str | None = None, out: str | Path | None = None
) -> None:
    """Raise what computing ``recipe`` on ``model`` into ``out`` would raise about its data,
    layers or output path, without loading the model."""
    check_data(recipe)
    if model is not None:
        check_model_source(model)
        count = layer_count(model)
        if count is not None:
            check_layers(recipe.search.layers, count, model)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InvalidArgumentError(f"output {out} is a file, not a directory", field="out")


def check_data(recipe: DirectionRecipe) -> None:
    """Read every data set of ``recipe`` (errors name the field and what a relative path is
    relative to)."""
    if recipe.kind is RecipeKind.STEERING:
        from steer.directions.steering import load_examples, load_neutral

        load_examples(recipe)
        load_neutral(recipe)
        return
    data = recipe.data
    for name in GATE_SETS:
        datasets.extra_sets(recipe, name)
    if data.gate_scenarios:
        from steer.directions.gate_scenarios import scenario_splits

        scenario_splits(recipe)
    if data.gate_scenes:
        from steer.directions.gating import check_scenes

        check_scenes(recipe)
    if recipe.kind is RecipeKind.PAIRS:
        datasets.recipe_pairs(recipe)
        return
    datasets.contrast_sets(recipe)


def check_model_source(model: str) -> None:
    if model in OFFLINE_MODELS or Path(model).expanduser().exists():
        return
    raise NotFoundError(
        f"{model!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor an existing "
        f"path ({datasets.relative_to(model) or 'an absolute path'})",
        field="model",
    )


def check_layers(layers: tuple[int, ...], count: int, model: str) -> None:
    bad = sorted({layer for layer in layers if not 0 <= layer < count})
    if bad:
        raise InvalidArgumentError(
            f"layers {bad} out of range: {model} has {count} layers (0-{count - 1})",
            field="search.layers",
        )


def layer_count(model: str) -> int | None:
    """The number of transformer blocks of ``model`` (an offline name, a HF directory, a LoRA
    adapter directory or a GGUF file) from its config or GGUF header; None if unknown."""
    path = resolve_offline(model) if model in OFFLINE_MODELS else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_block_count(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = _json(adapter).get("base_model_name_or_path")
        return layer_count(str(base)) if isinstance(base, str) and base else None
    config = _json(path / "config.json")
    for table in (config, config.get("text_config")):
        if isinstance(table, dict) and isinstance(table.get("num_hidden_layers"), int):
            return int(table["num_hidden_layers"])
    return None


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


#: GGUF metadata value types -> byte size of fixed-size ones (8 = string, 9 = array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTEGERS = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def gguf_block_count(path: Path) -> int | None:
    """``<architecture>.block_count`` from a GGUF file's header, reading only the metadata
    before it (transformers parses the whole vocabulary three times to get it)."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                return None
            _version, _tensors, count = struct.unpack("<IQQ", handle.read(20))
            for _ in range(count):
                (length,) = struct.unpack("<Q", handle.read(8))
                key = handle.read(length).decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", handle.read(4))
                if key.endswith(".block_count") and kind in _GGUF_INTEGERS:
                    size = _GGUF_SIZES[kind]
                    return int(struct.unpack(_GGUF_INTEGERS[kind], handle.read(size))[0])
                _skip(handle, kind)
    except (OSError, struct.error, KeyError):
        return None
    return None


def _skip(handle: BinaryIO, kind: int) -> None:
    if kind == 8:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(length, 1)
    elif kind == 9:
        item, count = struct.unpack("<IQ", handle.read(12))
        if item in _GGUF_SIZES:
            handle.seek(_GGUF_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip(handle, item)
    else:
        handle.seek(_GGUF_SIZES[kind], 1)
