"""Edit recipes read from TOML or a dict, validated with field names, and written back as TOML."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from steer.errors import InvalidArgumentError, NotFoundError
from steer.gates import GateScope
from steer.limits import finite
from steer.recipes.schema import (
    AblateEdit,
    AblationVariant,
    AddEdit,
    Edit,
    EditGate,
    EditKind,
    EditRecipe,
    FeatureEdit,
    Kernel,
)
from steer.toml_input import parse_toml, read_toml

_T = TypeVar("_T")

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
        "gate",
    },
    EditKind.ADD: {"kind", "vector", "strength", "layers", "hooks", "gate"},
    EditKind.FEATURE: {"kind", "sae", "feature", "value", "gate"},
}
_GATE = {
    "hook",
    "hooks",
    "weights",
    "direction",
    "sae",
    "feature",
    "threshold",
    "below",
    "scope",
    "reply_tokens",
    "reply_aggregate",
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
    edit: Edit
    if kind is EditKind.ABLATE:
        edit = _parse_ablate(table, where)
    elif kind is EditKind.ADD:
        edit = _parse_add(table, where)
    else:
        edit = _parse_feature(table, where)
    gate = _optional(table, "gate", _parse_gate, where)
    return edit if gate is None else replace(edit, gate=gate)


def _parse_gate(value: Any, where: str) -> EditGate:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError("expected a table", field=where)
    _check_keys(value, _GATE, where)
    if "threshold" not in value:
        raise InvalidArgumentError("missing", field=f"{where}.threshold")
    if ("direction" in value) == ("sae" in value):
        raise InvalidArgumentError(
            "give either direction (a projection) or sae and feature (an SAE feature's activation)",
            field=f"{where}.direction",
        )
    below = value.get("below", False)
    if not isinstance(below, bool):
        raise InvalidArgumentError(f"expected true or false, got {below!r}", field=f"{where}.below")
    try:
        scope = GateScope(value.get("scope", GateScope.TOKEN.value))
    except ValueError:
        raise InvalidArgumentError(
            f"unknown scope {value.get('scope')!r}; use token, prompt or reply",
            field=f"{where}.scope",
        ) from None
    reply_tokens = value.get("reply_tokens")
    if reply_tokens is not None and (
        isinstance(reply_tokens, bool) or not isinstance(reply_tokens, int)
    ):
        raise InvalidArgumentError(
            f"expected a whole number, got {reply_tokens!r}", field=f"{where}.reply_tokens"
        )
    aggregate = value.get("reply_aggregate")
    if aggregate is not None and not isinstance(aggregate, str):
        raise InvalidArgumentError(
            f"expected any or mean, got {aggregate!r}", field=f"{where}.reply_aggregate"
        )
    sae, feature = _gate_feature(value, where)
    bare = sae is not None and not {"hook", "hooks", "weights"} & set(value)
    hook, weights = ("", ()) if bare else _gate_hooks(value, where)
    if sae and not isinstance(hook, str):
        raise InvalidArgumentError("an SAE feature is read at one hook", field=f"{where}.hooks")
    return EditGate(
        hook=hook,
        direction="" if sae else _string(value["direction"], f"{where}.direction"),
        sae=sae,
        feature=feature,
        threshold=_number(value["threshold"], f"{where}.threshold"),
        below=below,
        scope=scope,
        weights=weights,
        reply_tokens=reply_tokens,
        reply_aggregate=aggregate,
    )


def _gate_feature(value: Mapping[str, Any], where: str) -> tuple[str | None, int | None]:
    """A feature gate's ``sae`` (a directory) and ``feature`` (an index); (None, None) for a
    direction's gate."""
    if "sae" not in value:
        if "feature" in value:
            raise InvalidArgumentError("a feature needs its sae", field=f"{where}.feature")
        return None, None
    feature = value.get("feature")
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
        raise InvalidArgumentError(
            f"expected a feature index >= 0, got {feature!r}", field=f"{where}.feature"
        )
    return _string(value["sae"], f"{where}.sae"), feature


def _gate_hooks(
    value: Mapping[str, Any], where: str
) -> tuple[str | tuple[str, ...], tuple[float, ...]]:
    """A gate's ``hook`` (one name), or its ``hooks`` (a list) with their ``weights``."""
    if ("hook" in value) == ("hooks" in value):
        raise InvalidArgumentError("give either hook or hooks", field=f"{where}.hook")
    if "hook" in value:
        if "weights" in value:
            raise InvalidArgumentError("weights need hooks (a list)", field=f"{where}.weights")
        return _string(value["hook"], f"{where}.hook"), ()
    hooks = value["hooks"]
    if not isinstance(hooks, list) or not hooks:
        raise InvalidArgumentError(
            f"expected a non-empty list of hook names, got {hooks!r}", field=f"{where}.hooks"
        )
    names = tuple(_string(h, f"{where}.hooks[{i}]") for i, h in enumerate(hooks))
    weights = value.get("weights", [])
    if not isinstance(weights, list) or len(weights) not in (0, len(names)):
        raise InvalidArgumentError(
            f"expected a list of {len(names)} numbers (one per hook), got {weights!r}",
            field=f"{where}.weights",
        )
    return names, tuple(_number(w, f"{where}.weights[{i}]") for i, w in enumerate(weights))


def _parse_ablate(table: Mapping[str, Any], where: str) -> AblateEdit:
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
    return AblateEdit(
        direction=_string(table.get("direction"), f"{where}.direction"),
        variant=variant,
        weight=_number(table.get("weight", 1.0), f"{where}.weight"),
        layers=_layers(table.get("layers"), f"{where}.layers"),
        kernel=kernel,
        mlp_kernel=mlp_kernel,
        direction_layer=_optional(table, "direction_layer", _number, where),
        harmless_mean=_optional(table, "harmless_mean", _string, where),
        embedding_weight=_optional(table, "embedding_weight", _number, where),
    )


def _optional(
    table: Mapping[str, Any], key: str, parse: Callable[[Any, str], _T], where: str
) -> _T | None:
    """``table[key]`` parsed, or None when it is absent (or null in a dict recipe)."""
    value = table.get(key)
    return None if value is None else parse(value, f"{where}.{key}")


def _parse_add(table: Mapping[str, Any], where: str) -> AddEdit:
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


def _parse_feature(table: Mapping[str, Any], where: str) -> FeatureEdit:
    feature = table.get("feature")
    if not isinstance(feature, int) or isinstance(feature, bool) or feature < 0:
        raise InvalidArgumentError("expected a feature index >= 0", field=f"{where}.feature")
    return FeatureEdit(
        sae=_string(table.get("sae"), f"{where}.sae"),
        feature=feature,
        value=_number(table.get("value"), f"{where}.value"),
    )


def parse_edit_recipe(data: Mapping[str, Any], *, base_dir: Path | None = None) -> EditRecipe:
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
    return EditRecipe(
        edits=tuple(_parse_edit(edit, f"edits[{index}]") for index, edit in enumerate(edits)),
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        dtype=dtype,
        base_dir=base_dir or Path.cwd(),
    )


def load_edit_recipe(source: str | Path | Mapping[str, Any]) -> EditRecipe:
    """A recipe from a TOML file path, TOML text, or a dict."""
    if isinstance(source, Mapping):
        return parse_edit_recipe(source)
    text = str(source)
    path = Path(text)
    if "\n" not in text and "=" not in text:
        if not path.exists():
            raise NotFoundError(f"recipe file {text!r} does not exist", field="recipe")
        data = read_toml(path, field="recipe")
        return parse_edit_recipe(data, base_dir=path.resolve().parent)
    return parse_edit_recipe(parse_toml(text, what="recipe TOML", field="recipe"))


def recipe_to_dict(recipe: EditRecipe) -> dict[str, Any]:
    """The recipe as plain data (for provenance), artifact paths made absolute."""
    result: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "edits": [_edit_dict(recipe, edit) for edit in recipe.edits],
    }
    if recipe.dtype:
        result["dtype"] = recipe.dtype
    return result


def _edit_dict(recipe: EditRecipe, edit: Edit) -> dict[str, Any]:
    entry = _ungated_dict(recipe, edit)
    if edit.gate is not None:
        gate = edit.gate
        hooks: dict[str, Any] = {"hook": gate.hook} if gate.hook else {}
        if not isinstance(gate.hook, str):
            hooks = {"hooks": list(gate.hook), "weights": list(gate.weights)}
        if gate.sae is not None:
            hooks.update(sae=str(recipe.resolve(gate.sae)), feature=gate.feature)
        else:
            hooks.update(direction=str(recipe.resolve(gate.direction)))
        entry["gate"] = {
            **hooks,
            "threshold": gate.threshold,
            "below": gate.below,
            "scope": gate.scope.value,
        }
        if gate.reply_tokens is not None:
            entry["gate"]["reply_tokens"] = gate.reply_tokens
        if gate.reply_aggregate is not None:
            entry["gate"]["reply_aggregate"] = gate.reply_aggregate
    return entry


def _ungated_dict(recipe: EditRecipe, edit: Edit) -> dict[str, Any]:
    if isinstance(edit, FeatureEdit):
        return {
            "kind": "feature",
            "sae": str(recipe.resolve(edit.sae)),
            "feature": edit.feature,
            "value": edit.value,
        }
    if isinstance(edit, AddEdit):
        entry: dict[str, Any] = {
            "kind": "add",
            "vector": str(recipe.resolve(edit.vector)),
            "strength": edit.strength,
        }
        if edit.layers is not None:
            entry["layers"] = list(edit.layers)
        if edit.hooks:
            entry["hooks"] = list(edit.hooks)
        return entry
    entry = {
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
    return entry


def recipe_to_toml(recipe: EditRecipe) -> str:
    """The recipe as TOML that :func:`load_edit_recipe` reads back (artifact paths absolute)."""
    return toml_text(recipe_to_dict(recipe))


def toml_text(data: Mapping[str, Any]) -> str:
    """``data`` as TOML text: scalars and lists of them, tables, and lists of tables written as
    ``[[name]]`` (a recipe's ``[[edits]]``); what :func:`load_edit_recipe` and a server read
    back."""
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
