"""Edit recipes: one typed schema for edits that run at inference time or are baked into weights.

A recipe is a TOML file (or the same structure as a dict) listing edits applied in order::

    name = "qwen-no-refusal"
    description = "Arditi-style abliteration with the refusal direction of layer 14"
    dtype = "bfloat16"                 # optional: output dtype of a baked model

    [[edits]]
    kind = "ablate"                    # ablate | add | feature
    direction = "refusal-direction"    # a steer vector artifact, relative to the recipe file
    variant = "standard"               # standard | projected | norm_preserving
    direction_layer = 14               # use this layer's vector everywhere (a float interpolates)
    weight = 1.0                       # constant per-layer weight ...
    # [edits.kernel]                   # ... or a heretic-style kernel over layers
    # max_weight = 1.0; min_weight = 0.3; peak_layer = 14.0; width = 6.0

    [[edits]]
    kind = "add"
    vector = "cheerful"                # added at blocks.L.hook_resid_post for each listed layer
    strength = 0.3
    layers = [10]

Every edit converts to steer :class:`~steer.interventions.Intervention` objects
(:meth:`Recipe.interventions`); the run-time engine applies those, and :mod:`steer.bake`
turns the very same objects into weight deltas, so the two forms cannot drift apart.
Validation errors name the field, e.g. ``edits[1].strength: must be finite``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import VectorArtifact, load_vector
from steer.errors import InvalidArgumentError, NotFoundError, SteerError
from steer.hooks import HookKind, parse_hook_name, resid_post_hooks
from steer.interventions import Ablate, Add, Intervention
from steer.limits import finite
from steer.vectors import SteeringVector


class EditKind(StrEnum):
    ABLATE = "ablate"
    ADD = "add"
    FEATURE = "feature"


class AblationVariant(StrEnum):
    #: W <- W - w r r^T W on every matrix that writes the residual stream
    STANDARD = "standard"
    #: the same with r' = normalise(r - (r.g^) g^), g the harmless mean at each layer
    PROJECTED = "projected"
    #: standard, then each written d_model vector (a column of o_proj/down_proj, a row of the
    #: embedding) is rescaled to its original norm; has no activation-space form
    NORM_PRESERVING = "norm_preserving"


#: hook kinds the weight form of an ablation acts on: the embedding (resid_pre of layer 0) and
#: the attention and MLP outputs of each layer
WEIGHT_ABLATION_KINDS = (HookKind.ATTN_OUT, HookKind.MLP_OUT)


@dataclass(frozen=True)
class Kernel:
    """heretic-style layer weights: ``max + (|l - peak| / width) (min - max)`` within ``width``
    of ``peak_layer``, 0 outside."""

    max_weight: float
    min_weight: float
    peak_layer: float
    width: float

    def weight_at(self, layer: int) -> float:
        distance = abs(layer - self.peak_layer)
        if distance > self.width:
            return 0.0
        return self.max_weight + (distance / self.width) * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class AblateEdit:
    direction: str
    variant: AblationVariant = AblationVariant.STANDARD
    weight: float = 1.0
    layers: tuple[int, ...] | None = None
    kernel: Kernel | None = None
    #: a separate kernel for the MLP outputs (heretic); ``kernel`` then covers attention only
    mlp_kernel: Kernel | None = None
    direction_layer: float | None = None
    harmless_mean: str | None = None
    #: weight of the embedding edit (resid_pre of layer 0); default: the weight at layer 0
    embedding_weight: float | None = None
    kind: EditKind = EditKind.ABLATE

    def layer_weight(self, layer: int, *, mlp: bool = False) -> float:
        if mlp and self.mlp_kernel is not None:
            return self.mlp_kernel.weight_at(layer)
        if self.kernel is not None:
            return self.kernel.weight_at(layer)
        if self.layers is not None and layer not in self.layers:
            return 0.0
        return self.weight


@dataclass(frozen=True)
class AddEdit:
    vector: str
    strength: float = 1.0
    layers: tuple[int, ...] | None = None
    hooks: tuple[str, ...] = ()
    kind: EditKind = EditKind.ADD


@dataclass(frozen=True)
class FeatureEdit:
    """An SAE feature slider baked as its decoder direction: approximate (the run-time slider
    sets the feature's activation; the bake adds ``value * W_dec[feature]`` to every token)."""

    sae: str
    feature: int
    value: float
    kind: EditKind = EditKind.FEATURE
    approximate: bool = True


Edit = AblateEdit | AddEdit | FeatureEdit


@dataclass(frozen=True)
class Recipe:
    edits: tuple[Edit, ...]
    name: str = ""
    description: str = ""
    dtype: str | None = None
    #: directory relative artifact paths are resolved against
    base_dir: Path = field(default_factory=Path.cwd)

    def artifact_paths(self) -> list[Path]:
        paths = []
        for edit in self.edits:
            if isinstance(edit, AblateEdit):
                paths.append(self.resolve(edit.direction))
                if edit.harmless_mean:
                    paths.append(self.resolve(edit.harmless_mean))
            elif isinstance(edit, AddEdit):
                paths.append(self.resolve(edit.vector))
            else:
                paths.append(self.resolve(edit.sae))
        return paths

    def resolve(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def interventions(
        self,
        num_layers: int,
        *,
        load: Callable[[Path], VectorArtifact] | None = None,
    ) -> list[tuple[Edit, list[Intervention]]]:
        """Each edit with the interventions it lowers to, in recipe order.

        ``load`` reads a vector artifact (default :func:`steer.artifacts.load_vector` without a
        model check; pass one that checks against your model).
        """
        loader = load or (lambda path: load_vector(path))
        result: list[tuple[Edit, list[Intervention]]] = []
        for index, edit in enumerate(self.edits):
            where = f"edits[{index}]"
            if isinstance(edit, AblateEdit):
                result.append((edit, _ablate_interventions(self, edit, num_layers, loader, where)))
            elif isinstance(edit, AddEdit):
                addition = loader(self.resolve(edit.vector)).addition(
                    edit.strength, hooks=edit.hooks or None, layers=edit.layers
                )
                hooks = addition.hooks or resid_post_hooks(addition.vector.layers)
                if not hooks:
                    raise InvalidArgumentError(
                        "a shared vector needs `layers` or `hooks`", field=f"{where}.layers"
                    )
                for hook in hooks:
                    parse_hook_name(hook, num_layers, field=f"{where}.hooks")
                result.append((edit, [addition]))
            else:
                result.append((edit, [_feature_intervention(self, edit, num_layers, where)]))
        return result

    def lowered(
        self,
        num_layers: int,
        *,
        load: Callable[[Path], VectorArtifact] | None = None,
    ) -> list[Intervention]:
        """All the recipe's interventions in order, as the run-time engine applies them."""
        return [i for _edit, group in self.interventions(num_layers, load=load) for i in group]


def _direction(
    recipe: Recipe,
    edit: AblateEdit,
    num_layers: int,
    loader: Callable[[Path], VectorArtifact],
    where: str,
) -> SteeringVector:
    vector = loader(recipe.resolve(edit.direction)).vector
    if edit.direction_layer is not None:
        vector = SteeringVector.from_shared(
            _interpolate(vector, edit.direction_layer, f"{where}.direction_layer"),
            name=vector.name,
        )
    if edit.variant is AblationVariant.PROJECTED:
        if edit.harmless_mean is None:
            raise InvalidArgumentError(
                "the projected variant needs harmless_mean (a vector artifact of the mean "
                "harmless activation per layer)",
                field=f"{where}.harmless_mean",
            )
        mean = loader(recipe.resolve(edit.harmless_mean)).vector
        vector = _project_off(vector, mean, num_layers)
    return vector


def _interpolate(vector: SteeringVector, position: float, field_name: str) -> torch.Tensor:
    """The unit direction at a fractional layer: interpolate the neighbours' unit vectors."""
    low = math.floor(position)
    high = math.ceil(position)
    for layer in {low, high}:
        if not vector.has_layer(layer):
            raise InvalidArgumentError(
                f"the direction has no vector for layer {layer}; it covers {list(vector.layers)}",
                field=field_name,
            )
    unit_low = vector.at(low) / vector.at(low).norm()
    unit_high = vector.at(high) / vector.at(high).norm()
    fraction = position - low
    mixed = (1 - fraction) * unit_low + fraction * unit_high
    return mixed / mixed.norm()


def _project_off(
    direction: SteeringVector, mean: SteeringVector, num_layers: int
) -> SteeringVector:
    """r'_L = normalise(r_L - (r_L . g^_L) g^_L) for every layer."""
    per_layer = {}
    for layer in range(num_layers):
        if not direction.has_layer(layer):
            continue
        unit = direction.at(layer) / direction.at(layer).norm()
        harmless = mean.at(layer) / mean.at(layer).norm()
        projected = unit - (unit @ harmless) * harmless
        per_layer[layer] = projected / projected.norm()
    return SteeringVector(per_layer=per_layer, name=direction.name)


def _ablate_interventions(
    recipe: Recipe,
    edit: AblateEdit,
    num_layers: int,
    loader: Callable[[Path], VectorArtifact],
    where: str,
) -> list[Intervention]:
    """The weight form: each layer's attention and MLP outputs, plus the embedding as
    ``resid_pre`` of layer 0. (With one direction at weight 1 everywhere this equals the plain
    ``Ablate(direction)``, whose resid_pre projections at later layers are then no-ops.)"""
    direction = _direction(recipe, edit, num_layers, loader, where)
    if edit.layers is not None:
        for layer in edit.layers:
            if not 0 <= layer < num_layers:
                raise InvalidArgumentError(
                    f"layer {layer} out of range: the model has layers 0..{num_layers - 1}",
                    field=f"{where}.layers",
                )

    def weights(mlp: bool) -> dict[int, float]:
        table = {layer: edit.layer_weight(layer, mlp=mlp) for layer in range(num_layers)}
        table = {layer: w for layer, w in table.items() if w != 0.0}
        for layer in table:
            if not direction.has_layer(layer):
                raise InvalidArgumentError(
                    f"the direction has no vector for layer {layer}; set direction_layer or layers",
                    field=f"{where}.direction",
                )
        return table

    if edit.mlp_kernel is None:
        result: list[Intervention] = [
            Ablate(direction, layer_weights=weights(False), kinds=WEIGHT_ABLATION_KINDS)
        ]
    else:
        result = [
            Ablate(direction, layer_weights=weights(False), kinds=(HookKind.ATTN_OUT,)),
            Ablate(direction, layer_weights=weights(True), kinds=(HookKind.MLP_OUT,)),
        ]
    embedding = edit.embedding_weight if edit.embedding_weight is not None else edit.layer_weight(0)
    if embedding != 0.0:
        result.append(Ablate(direction, layers=(0,), weight=embedding, kinds=(HookKind.RESID_PRE,)))
    return result


def _feature_intervention(
    recipe: Recipe, edit: FeatureEdit, num_layers: int, where: str
) -> Intervention:
    from steer.sae.loading import decoder_row

    try:
        hook, row = decoder_row(recipe.resolve(edit.sae), edit.feature)
        parse_hook_name(hook, num_layers, field="sae")
    except SteerError as error:
        error.field = f"{where}.{error.field}" if error.field else where
        raise
    vector = SteeringVector.from_shared(row, name=f"feature-{edit.feature}")
    return Add(vector, edit.value, hooks=(hook,))


# ---------------------------------------------------------------------------------------------
# Parsing and validation


_FIELDS: dict[EditKind, set[str]] = {
    EditKind.ABLATE: {
        "kind",
        "direction",
        "variant",
        "weight",
        "layers",
        "kernel",
        "mlp_kernel",
        "direction_layer",
        "harmless_mean",
        "embedding_weight",
    },
    EditKind.ADD: {"kind", "vector", "strength", "layers", "hooks"},
    EditKind.FEATURE: {"kind", "sae", "feature", "value"},
}
_TOP = {"name", "description", "dtype", "edits"}
_KERNEL = {"max_weight", "min_weight", "peak_layer", "width"}
DTYPES = ("float32", "bfloat16", "float16")


def _number(value: Any, field_name: str) -> float:
    return finite(value, field_name, numbers_only=True)


def _string(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"expected a non-empty string, got {value!r}", field=field_name)
    return value


def _layers(value: Any, field_name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise InvalidArgumentError(
            f"expected a list of layer indices, got {value!r}", field=field_name
        )
    return tuple(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise InvalidArgumentError(
                f"unknown key {key!r}; allowed: {', '.join(sorted(allowed))}",
                field=f"{prefix}{key}",
            )


def _parse_kernel(value: Any, where: str) -> Kernel | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentError("expected a table", field=where)
    _check_keys(value, _KERNEL, where)
    missing = _KERNEL - set(value)
    if missing:
        raise InvalidArgumentError(f"missing {', '.join(sorted(missing))}", field=where)
    kernel = Kernel(**{key: _number(value[key], f"{where}.{key}") for key in _KERNEL})
    if kernel.width <= 0:
        raise InvalidArgumentError("must be > 0", field=f"{where}.width")
    return kernel


def _parse_edit(table: Any, where: str) -> Edit:
    if not isinstance(table, Mapping):
        raise InvalidArgumentError("each edit is a table", field=where)
    try:
        kind = EditKind(str(table.get("kind")))
    except ValueError:
        raise InvalidArgumentError(
            f"unknown kind {table.get('kind')!r}; use {', '.join(k.value for k in EditKind)}",
            field=f"{where}.kind",
        ) from None
    _check_keys(table, _FIELDS[kind], where)
    if kind is EditKind.ABLATE:
        try:
            variant = AblationVariant(table.get("variant", "standard"))
        except ValueError:
            raise InvalidArgumentError(
                f"unknown variant {table.get('variant')!r}; use "
                f"{', '.join(v.value for v in AblationVariant)}",
                field=f"{where}.variant",
            ) from None
        kernel = _parse_kernel(table.get("kernel"), f"{where}.kernel")
        mlp_kernel = _parse_kernel(table.get("mlp_kernel"), f"{where}.mlp_kernel")
        if mlp_kernel is not None and kernel is None:
            raise InvalidArgumentError(
                "mlp_kernel needs kernel (attention)", field=f"{where}.mlp_kernel"
            )
        if kernel is not None and ("weight" in table or "layers" in table):
            raise InvalidArgumentError(
                "give either kernel or weight/layers, not both", field=f"{where}.kernel"
            )
        direction_layer = table.get("direction_layer")
        embedding_weight = table.get("embedding_weight")
        return AblateEdit(
            direction=_string(table.get("direction"), f"{where}.direction"),
            variant=variant,
            weight=_number(table.get("weight", 1.0), f"{where}.weight"),
            layers=_layers(table.get("layers"), f"{where}.layers"),
            kernel=kernel,
            mlp_kernel=mlp_kernel,
            direction_layer=None
            if direction_layer is None
            else _number(direction_layer, f"{where}.direction_layer"),
            harmless_mean=None
            if table.get("harmless_mean") is None
            else _string(table["harmless_mean"], f"{where}.harmless_mean"),
            embedding_weight=None
            if embedding_weight is None
            else _number(embedding_weight, f"{where}.embedding_weight"),
        )
    if kind is EditKind.ADD:
        hooks = table.get("hooks", [])
        if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
            raise InvalidArgumentError("expected a list of hook names", field=f"{where}.hooks")
        if hooks and "layers" in table:
            raise InvalidArgumentError("give layers or hooks, not both", field=f"{where}.hooks")
        return AddEdit(
            vector=_string(table.get("vector"), f"{where}.vector"),
            strength=_number(table.get("strength", 1.0), f"{where}.strength"),
            layers=_layers(table.get("layers"), f"{where}.layers"),
            hooks=tuple(hooks),
        )
    feature = table.get("feature")
    if not isinstance(feature, int) or isinstance(feature, bool) or feature < 0:
        raise InvalidArgumentError("expected a feature index >= 0", field=f"{where}.feature")
    return FeatureEdit(
        sae=_string(table.get("sae"), f"{where}.sae"),
        feature=feature,
        value=_number(table.get("value"), f"{where}.value"),
    )


def parse_recipe(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict (the parsed TOML)."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError("a recipe is a table", field="recipe")
    _check_keys(data, _TOP, "")
    edits = data.get("edits")
    if not isinstance(edits, list) or not edits:
        raise InvalidArgumentError("a recipe needs at least one [[edits]] table", field="edits")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}", field="dtype"
        )
    return Recipe(
        edits=tuple(_parse_edit(edit, f"edits[{index}]") for index, edit in enumerate(edits)),
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        dtype=dtype,
        base_dir=base_dir or Path.cwd(),
    )


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """A recipe from a TOML file path, TOML text, or a dict."""
    if isinstance(source, Mapping):
        return parse_recipe(source)
    text = str(source)
    path = Path(text)
    if "\n" not in text and "=" not in text:
        if not path.exists():
            raise NotFoundError(f"recipe file {text!r} does not exist", field="recipe")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise InvalidArgumentError(f"{path}: {error}", field="recipe") from None
        return parse_recipe(data, base_dir=path.resolve().parent)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InvalidArgumentError(f"recipe TOML: {error}", field="recipe") from None
    return parse_recipe(data)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for provenance), artifact paths made absolute."""
    edits = []
    for edit in recipe.edits:
        if isinstance(edit, AblateEdit):
            entry: dict[str, Any] = {
                "kind": "ablate",
                "direction": str(recipe.resolve(edit.direction)),
                "variant": edit.variant.value,
            }
            if edit.kernel is not None:
                entry["kernel"] = _kernel_dict(edit.kernel)
                if edit.mlp_kernel is not None:
                    entry["mlp_kernel"] = _kernel_dict(edit.mlp_kernel)
            else:
                entry["weight"] = edit.weight
            if edit.layers is not None:
                entry["layers"] = list(edit.layers)
            if edit.direction_layer is not None:
                entry["direction_layer"] = edit.direction_layer
            if edit.harmless_mean is not None:
                entry["harmless_mean"] = str(recipe.resolve(edit.harmless_mean))
            if edit.embedding_weight is not None:
                entry["embedding_weight"] = edit.embedding_weight
        elif isinstance(edit, AddEdit):
            entry = {
                "kind": "add",
                "vector": str(recipe.resolve(edit.vector)),
                "strength": edit.strength,
            }
            if edit.layers is not None:
                entry["layers"] = list(edit.layers)
            if edit.hooks:
                entry["hooks"] = list(edit.hooks)
        else:
            entry = {
                "kind": "feature",
                "sae": str(recipe.resolve(edit.sae)),
                "feature": edit.feature,
                "value": edit.value,
            }
        edits.append(entry)
    result: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "edits": edits,
    }
    if recipe.dtype:
        result["dtype"] = recipe.dtype
    return result


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML text that :func:`load_recipe` reads back (artifact paths absolute)."""
    return toml_text(recipe_to_dict(recipe))


def toml_text(data: Mapping[str, Any]) -> str:
    """``data`` as TOML text: scalars and lists of them, tables, and lists of tables written as
    ``[[name]]`` (a recipe's ``[[edits]]``); what :func:`load_recipe` and a server read back."""
    return "\n".join(_toml_lines(data, "")).lstrip("\n") + "\n"


def _toml_lines(table: Mapping[str, Any], prefix: str) -> list[str]:
    lines, nested = [], []
    for key, value in table.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, Mapping):
            nested += ["", f"[{name}]", *_toml_lines(value, name)]
        elif (
            isinstance(value, list | tuple)
            and value
            and all(isinstance(item, Mapping) for item in value)
        ):
            for item in value:
                nested += ["", f"[[{name}]]", *_toml_lines(item, name)]
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return lines + nested


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _kernel_dict(kernel: Kernel) -> dict[str, float]:
    return {
        "max_weight": kernel.max_weight,
        "min_weight": kernel.min_weight,
        "peak_layer": kernel.peak_layer,
        "width": kernel.width,
    }
