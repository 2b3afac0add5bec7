"""The one entry point the gRPC server and the CLI call."""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from steer.bake import provenance
from steer.bake.control_vector import write_control_vector
from steer.bake.model import bake_weights
from steer.bake.options import BakeCancelled, BakeOptions
from steer.bake.resolve import resolve
from steer.bake.source import open_source
from steer.errors import FailedPreconditionError, InvalidArgumentError
from steer.offline import OFFLINE_MODELS, resolve_offline
from steer.recipes import EditRecipe, load_edit_recipe, recipe_to_dict
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
    root: pathlib.Path | None = None,
    keep: Iterable[pathlib.Path] = (),
    reserved: Iterable[pathlib.Path] = (),
) -> pathlib.Path:
    """Bake ``recipe`` (a TOML path, TOML text or dict) for ``model_source`` into ``out_dir``.

    ``output_format``: "model" (sharded safetensors + index + config + tokenizer), "lora" (a PEFT
    adapter on the source) or "control-vector" (a llama.cpp GGUF file at ``out_dir``). The output
    appears atomically or not at all; ``cancelled`` stops it between tensors. ``out_dir`` must
    pass :func:`check_output` (``root``, ``keep`` and ``reserved`` are its arguments).
    """
    options = BakeOptions(
        output_format=output_format,
        overwrite=overwrite,
        progress=progress,
        cancelled=cancelled,
        root=root,
        keep=tuple(keep),
        reserved=tuple(reserved),
    )
    return bake_with_options(model_source, load_edit_recipe(recipe), pathlib.Path(out_dir), options)


def bake_with_options(
    model_source: str, recipe: EditRecipe, out_dir: pathlib.Path, options: BakeOptions
) -> pathlib.Path:
    check_output(
        out_dir,
        output_format=options.output_format,
        overwrite=options.overwrite,
        root=options.root,
        keep=(*options.keep, source_path(model_source)),
        reserved=options.reserved,
    )
    recipe, options = without_gates(recipe, options)
    if options.output_format == "control-vector":
        return bake_control_vector(model_source, recipe, out_dir, options)
    return bake_weights(model_source, recipe, out_dir, options)


def without_gates(recipe: EditRecipe, options: BakeOptions) -> tuple[EditRecipe, BakeOptions]:
    """``recipe`` with its gates dropped and ``options`` with a note per dropped gate (for the
    provenance), when ``options.ungated`` asks for it; a gated recipe is refused otherwise."""
    gated = [index for index, edit in enumerate(recipe.edits) if edit.gate is not None]
    if not gated:
        return recipe, options
    if not options.ungated:
        raise InvalidArgumentError(
            "weights cannot hold a gate: a baked edit acts on every token of every prompt. "
            "Apply the recipe at run time to keep the gate, or bake the ungated edit "
            "explicitly (steer bake --ungated, BakeOptions(ungated=True))",
            field=f"edits[{gated[0]}].gate",
        )
    notes = list(options.notes)
    for index in gated:
        gate = recipe.edits[index].gate
        assert gate is not None
        notes.append(
            f"UNGATED: edits[{index}]'s gate (hook {_hooks_text(gate.hook)}, direction "
            f"{recipe.resolve(gate.direction)}, threshold {gate.threshold!r}, below "
            f"{str(gate.below).lower()}, scope {gate.scope.value}) was dropped; the baked edit "
            "acts everywhere"
        )
    return recipe.ungated(), replace(options, notes=notes)


def bake_control_vector(
    model_source: str, recipe: EditRecipe, out_path: pathlib.Path, options: BakeOptions
) -> pathlib.Path:
    """Additive edits at resid_post (or what is equivalent to it) as one control-vector GGUF."""
    source = open_source(
        model_source, allow_pickle=options.allow_pickle, check=options.check_cancelled
    )
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
        record: dict[str, object] = {
            "recipe": recipe_to_dict(recipe),
            "source": source.name,
            "directions": resolved.artifacts,
        }
        if options.notes:
            record["notes"] = list(options.notes)
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


def source_path(model_source: str) -> pathlib.Path:
    """Where ``model_source`` (an offline name or a path) is on disk."""
    if model_source in OFFLINE_MODELS:
        return resolve_offline(model_source)
    return pathlib.Path(model_source)


def check_output(
    target: pathlib.Path,
    *,
    output_format: str,
    overwrite: bool,
    root: pathlib.Path | None = None,
    keep: Iterable[pathlib.Path] = (),
    reserved: Iterable[pathlib.Path] = (),
    field: str = "out_dir",
) -> None:
    """Refuse a bake output that could destroy or shadow anything: the one rule the server (at
    request time and in the job) and the library (so ``steer bake --overwrite`` too) enforce.

    An output is a new directory (a file for a control vector); with ``overwrite`` it may
    instead replace a previous steer bake output of the same kind and nothing else
    (:func:`steer.bake.provenance.is_bake_output`). It is never ``root`` itself (when given, the
    output must lie strictly below it), never a path in ``keep`` (the bake source, what a server
    serves) or an ancestor of one, never inside ``reserved`` (e.g. the artifact store) or inside
    another bake output. Messages name paths relative to ``root`` when it is given.
    """
    if output_format not in OUTPUT_FORMATS:
        raise InvalidArgumentError(
            f"unknown output format {output_format!r}; use {', '.join(OUTPUT_FORMATS)}",
            field="output_format",
        )
    resolved = target.resolve()
    shown = _shown(resolved, root)
    if root is not None and root.resolve() not in resolved.parents:
        raise InvalidArgumentError(
            f"{shown} is not a new path strictly below the models root", field=field
        )
    for path in keep:
        kept = path.resolve()
        if resolved == kept or resolved in kept.parents:
            raise InvalidArgumentError(
                f"{shown} would replace {_shown(kept, root)}, which must be kept (a bake source, "
                "a served model, an SAE or the artifact store); choose a new output path",
                field=field,
            )
    _check_ancestors(resolved, shown, root, reserved, field)
    if target.is_symlink():
        raise FailedPreconditionError(
            f"{_shown(target, root)} is a symbolic link; name a new path instead", field=field
        )
    directory = output_format != "control-vector"
    provenance.check_target(resolved, overwrite, directory=directory, shown=shown, field=field)


def _check_ancestors(
    resolved: pathlib.Path,
    shown: str,
    root: pathlib.Path | None,
    reserved: Iterable[pathlib.Path],
    field: str,
) -> None:
    """The output's directories: none reserved or a bake output, the nearest existing one a
    directory (a file there would fail the bake later)."""
    for path in reserved:
        place = path.resolve()
        if resolved == place or place in resolved.parents:
            raise InvalidArgumentError(
                f"{shown} lies in {_shown(place, root)}, which the server manages; choose a path "
                "outside it",
                field=field,
            )
    for parent in resolved.parents:
        if parent.is_dir() and provenance.is_bake_output(parent):
            raise InvalidArgumentError(
                f"{shown} lies inside the bake output {_shown(parent, root)}; choose a path "
                "outside it",
                field=field,
            )
        if parent.exists() and not parent.is_dir():
            raise InvalidArgumentError(
                f"{_shown(parent, root)} is a file, not a directory", field=field
            )


def _shown(path: pathlib.Path, root: pathlib.Path | None) -> str:
    """``path`` as a message shows it: relative to ``root`` when given (a server's clients never
    see its absolute paths)."""
    if root is None:
        return str(path)
    base = root.resolve()
    if path == base:
        return "the models root"
    if base in path.parents:
        return path.relative_to(base).as_posix()
    return path.name


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


__all__ = [
    "OUTPUT_FORMATS",
    "BakeCancelled",
    "bake",
    "bake_with_options",
    "check_output",
    "recipe_from_flags",
    "source_path",
]


def _hooks_text(hook: str | tuple[str, ...]) -> str:
    return hook if isinstance(hook, str) else " + ".join(hook)
