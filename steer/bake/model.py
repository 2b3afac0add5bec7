"""Bake a recipe into a new model directory or a PEFT LoRA adapter, shard by shard.

``bake_weights`` reads as its steps: open the source -> lower the recipe to interventions ->
plan the weight deltas -> check the architecture and the directions' model identity (cheap
fields) -> lay out the output -> stream every tensor through its edit into the temporary
directory, hashing source and output on the way -> config, index, tokenizer -> compare the
directions' weight hash -> provenance -> atomic rename. The source is read once.
"""

from __future__ import annotations

from pathlib import Path

from steer.bake import provenance
from steer.bake.edits import check_bias, check_layout
from steer.bake.lora import write_lora
from steer.bake.names import Names
from steer.bake.options import BakeOptions
from steer.bake.resolve import check_directions_model, expected_weight_hashes, resolve
from steer.bake.source import Source, open_source
from steer.bake.writer import plan_output, write_model
from steer.errors import InvalidArgumentError
from steer.hooks import layout_for
from steer.models import DTYPES
from steer.recipes import EditRecipe, recipe_to_dict


def bake_weights(
    model_source: str, recipe: EditRecipe, out_dir: Path, options: BakeOptions
) -> Path:
    """Bake ``recipe`` into a model directory (format "model") or a LoRA adapter ("lora")."""
    if options.output_format not in ("model", "lora"):
        raise InvalidArgumentError(
            f"unknown output format {options.output_format!r}", field="output_format"
        )
    dtype_name = options.dtype or recipe.dtype
    if dtype_name is not None and dtype_name not in DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {dtype_name!r}; use {', '.join(DTYPES)}", field="dtype"
        )
    options.report("opening source", 0.0)
    source = open_source(
        model_source, allow_pickle=options.allow_pickle, check=options.check_cancelled
    )
    try:
        return _bake(source, recipe, out_dir, options, dtype_name or source.stored_dtype)
    finally:
        source.close()


def _bake(
    source: Source, recipe: EditRecipe, out_dir: Path, options: BakeOptions, dtype_name: str | None
) -> Path:
    config = source.config
    num_layers, d_model = int(config["num_hidden_layers"]), int(config["hidden_size"])
    layout = layout_for(source.model_type)
    names = Names(layout)
    resolved = resolve(recipe, num_layers=num_layers, d_model=d_model)
    plan = resolved.plan
    if plan.attention or plan.mlp or plan.has_bias or plan.embedding_shift is not None:
        check_layout(layout, source.model_type)
    if plan.has_bias:
        check_bias(layout, source.model_type)
    expected = expected_weight_hashes(resolved.artifacts, source, options)
    notes = list(options.notes)
    if dtype_name is None and options.output_format == "model" and source.dtype_note:
        notes.append(source.dtype_note)
    if resolved.approximate:
        notes.append(
            "APPROXIMATE: SAE feature edits are baked as value * decoder direction added to every "
            "token; the run-time slider sets the feature activation instead"
        )
    # one pass over the source: the file hashes (provenance) and, when a direction names its
    # model, the weight hash are fed by the reads that produce the output
    source.start_file_hashes()
    if expected:
        source.start_weight_hashes()
    with provenance.atomic_directory(out_dir, overwrite=options.overwrite) as temp:
        if options.output_format == "lora":
            hashes = write_lora(temp, source, plan, names, options)
        else:
            dtype = DTYPES[dtype_name] if dtype_name else None
            output = plan_output(source, plan, names, num_layers, dtype, notes)
            hashes = write_model(temp, source, output, options)
        # a mismatch raises here, before the rename: nothing appears at the target
        weight_hash = check_directions_model(expected, resolved.artifacts, source, options)
        options.report("hashing source", 0.0)
        record = provenance.record(
            output_format=options.output_format,
            source={
                "name": source.name,
                "model_type": source.model_type,
                "weight_hash": weight_hash,
                "files": source.file_hashes(),
            },
            recipe=recipe_to_dict(recipe),
            directions=resolved.artifacts,
            files=hashes,
            notes=notes,
        )
        provenance.write(temp, record)
        options.report("done", 1.0)
    return out_dir
