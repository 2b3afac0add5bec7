"""The one entry point the gRPC server and the CLI call."""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from steer.bake import provenance
from steer.bake.control_vector import write_control_vector
from steer.bake.model import BakeCancelled, BakeOptions, bake_weights, resolve
from steer.bake.source import open_source
from steer.errors import InvalidArgumentError
from steer.recipes import Recipe, load_recipe, recipe_to_dict
from steer.vectors import SteeringVector

OUTPUT_FORMATS = ("model", "lora", "control-vector")


def bake(
    model_source: str,
    recipe: str | dict,
    out_dir: str | pathlib.Path,
    *,
    output_format: str = "model",
    overwrite: bool = False,
    progress: Callable[[str, float], None] | None = None,
    cancelled: threading.Event | None = None,
) -> pathlib.Path:
    """Bake ``recipe`` (a TOML path, TOML text or dict) for ``model_source`` into ``out_dir``.

    ``output_format``: "model" (sharded safetensors + index + config + tokenizer), "lora" (a PEFT
    adapter on the source) or "control-vector" (a llama.cpp GGUF file at ``out_dir``). The output
    appears atomically or not at all; ``cancelled`` stops it between tensors.
    """
    options = BakeOptions(
        output_format=output_format, overwrite=overwrite, progress=progress, cancelled=cancelled
    )
    return bake_with_options(model_source, load_recipe(recipe), pathlib.Path(out_dir), options)


def bake_with_options(
    model_source: str, recipe: Recipe, out_dir: pathlib.Path, options: BakeOptions
) -> pathlib.Path:
    if options.output_format not in OUTPUT_FORMATS:
        raise InvalidArgumentError(
            f"unknown output format {options.output_format!r}; use {', '.join(OUTPUT_FORMATS)}",
            field="output_format",
        )
    if options.output_format == "control-vector":
        return bake_control_vector(model_source, recipe, out_dir, options)
    return bake_weights(model_source, recipe, out_dir, options)


def bake_control_vector(
    model_source: str, recipe: Recipe, out_path: pathlib.Path, options: BakeOptions
) -> pathlib.Path:
    """Additive edits at resid_post (or what is equivalent to it) as one control-vector GGUF."""
    provenance.check_target(out_path, options.overwrite)
    source = open_source(model_source, allow_pickle=options.allow_pickle)
    try:
        config = source.config
        num_layers, d_model = int(config["num_hidden_layers"]), int(config["hidden_size"])
        resolved = resolve(recipe, num_layers=num_layers, d_model=d_model)
        plan = resolved.plan
        if plan.embedding or plan.attention or plan.mlp or plan.embedding_shift is not None:
            raise InvalidArgumentError(
                "a control vector holds additive vectors only (at blocks.L.hook_resid_post for "
                "L >= 1); this recipe ablates or edits the embedding",
                field="output_format",
            )
        vector = SteeringVector(per_layer=dict(plan.down_bias), name=recipe.name)
        record = {
            "recipe": recipe_to_dict(recipe),
            "source": source.name,
            "directions": resolved.artifacts,
        }
        with provenance.atomic_file(out_path, overwrite=options.overwrite) as temp:
            write_control_vector(
                temp,
                vector,
                model_hint=source.model_type,
                provenance=json.loads(json.dumps(record, default=str)),
            )
        return out_path
    finally:
        source.close()


def recipe_from_flags(
    ablate: list[str], add: list[str], *, variant: str = "standard"
) -> Mapping[str, Any]:
    """The recipe dict for ``--ablate DIR ... --add DIR:STRENGTH ...``."""
    edits: list[dict[str, Any]] = [
        {"kind": "ablate", "direction": path, "variant": variant} for path in ablate
    ]
    for item in add:
        path, separator, strength = item.rpartition(":")
        if not separator or not path:
            raise InvalidArgumentError(f"expected DIR:STRENGTH, got {item!r}", field="add")
        try:
            value = float(strength)
        except ValueError:
            raise InvalidArgumentError(
                f"strength {strength!r} in {item!r} is not a number", field="add"
            ) from None
        edits.append({"kind": "add", "vector": path, "strength": value})
    return {"name": "command-line", "edits": edits}


__all__ = ["OUTPUT_FORMATS", "BakeCancelled", "bake", "bake_with_options", "recipe_from_flags"]
