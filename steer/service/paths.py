"""User-supplied paths stay inside the models root: no absolute paths, ``..`` or symlink escapes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError, NotFoundError, SteerError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def confine(root: Path, relative: str, *, field: str, must_exist: bool = True) -> Path:
    """Resolve ``relative`` under ``root`` (symlinks followed) and refuse anything outside it."""
    if not relative or "\x00" in relative:
        raise InvalidArgumentError("empty or invalid path", field=field)
    candidate = Path(relative)
    if candidate.is_absolute():
        raise InvalidArgumentError(
            "absolute paths are not accepted; give a path relative to the models root", field=field
        )
    base = root.resolve()
    try:
        resolved = (base / candidate).resolve()
        exists = resolved.exists()
    except (OSError, RuntimeError) as error:  # a name too long; RuntimeError: a symlink loop
        reason = error.strerror if isinstance(error, OSError) else "a symlink loop"
        raise InvalidArgumentError(  # not str(error): that shows where the models root is
            f"{relative[:200]!r} is not a usable path ({reason})", field=field
        ) from None
    if resolved != base and base not in resolved.parents:
        raise InvalidArgumentError(f"{relative[:200]!r} leaves the models root", field=field)
    if must_exist and not exists:
        raise NotFoundError(f"{relative[:200]!r} does not exist under the models root", field=field)
    return resolved


def is_id(value: str) -> bool:
    """A single safe directory name: letters, digits, '.', '_', '-', not starting with '.'."""
    return _ID.fullmatch(value) is not None  # match() would accept a trailing newline


def check_id(value: str, *, field: str) -> str:
    """An id that is a single safe directory name (letters, digits, '.', '_', '-')."""
    if not is_id(value):
        raise InvalidArgumentError(
            f"invalid id {value!r}: use 1-128 letters, digits, '.', '_' or '-', not starting "
            "with '.', '_' or '-'",
            field=field,
        )
    return value


def confine_from(root: Path, base: Path, value: str, *, field: str) -> Path:
    """``value`` relative to ``base`` (a directory inside ``root``), confined to ``root``."""
    if Path(value).is_absolute():
        raise InvalidArgumentError(
            "absolute paths are not accepted; give a path relative to the models root", field=field
        )
    relative = os.path.relpath((base.resolve() / value).resolve(), root.resolve())
    return confine(root, relative, field=field)


#: recipe values that name built-in data rather than a file
_BUILTIN_DATA = ("strongreject",)
#: the data fields of a direction recipe that name files (recipe.DataSection)
_DATA_KEYS = (
    "positive",
    "negative",
    "pairs",
    "positive_extra",
    "negative_extra",
    "gate_fire",
    "gate_quiet",
    "gate_harmless",
    "gate_scenarios",
)
_EDIT_KEYS = ("direction", "harmless_mean", "vector", "sae")


def _confined_data(value: Any, root: Path, base: Path, field: str) -> Any:
    """One data-set reference of a recipe, a file path confined to ``root`` (anything else
    as it is, for the recipe's own validation to judge)."""
    if isinstance(value, str) and value.startswith("recipes:") and not _is_builtin(value):
        raise InvalidArgumentError(
            "recipes:NAME takes a plain file name of the project's recipes/data", field=field
        )
    if isinstance(value, str) and value and not _is_builtin(value):
        return str(confine_from(root, base, value, field=field))
    return value


def confine_recipe(
    recipe: dict[str, Any], root: Path, base: Path, artifacts: Path
) -> dict[str, Any]:
    """A copy of a direction or bake recipe whose file references all lie under ``root``.

    Data sets (``data.positive`` ...) may be built-in names (``strongreject``,
    ``recipes:FILE``) or paths; edit artifacts (``edits[i].direction`` ...) may be artifact ids
    on the server or paths. Relative paths are taken from ``base`` (the recipe file's directory,
    or the models root for inline TOML) and must stay inside the root.
    """
    result = dict(recipe)
    data = result.get("data")
    if isinstance(data, dict):
        data = dict(data)
        for key in _DATA_KEYS:
            if key not in data:
                continue
            value = data[key]
            if isinstance(value, list):  # several sets (data.positive_extra ...)
                data[key] = [
                    _confined_data(item, root, base, f"recipe.data.{key}[{index}]")
                    for index, item in enumerate(value)
                ]
            else:
                data[key] = _confined_data(value, root, base, f"recipe.data.{key}")
        result["data"] = data
    sweep = result.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("neutral"), str) and sweep["neutral"]:
        # a steering recipe's neutral prompts are a data file like data.positive
        neutral = sweep["neutral"]
        if not _is_builtin(neutral):
            sweep = dict(
                sweep, neutral=str(confine_from(root, base, neutral, field="recipe.sweep.neutral"))
            )
            result["sweep"] = sweep
    edits = result.get("edits")
    if isinstance(edits, list):
        confined = []
        for index, edit in enumerate(edits):
            if isinstance(edit, dict):
                where = f"recipe.edits[{index}]"
                edit = _confine_edit(edit, _EDIT_KEYS, root, base, artifacts, where)
                if isinstance(edit.get("gate"), dict):  # a gate's direction is an artifact too
                    gate = edit["gate"]
                    edit["gate"] = _confine_edit(
                        gate, ("direction",), root, base, artifacts, f"{where}.gate"
                    )
            confined.append(edit)
        result["edits"] = confined
    return result


def _confine_edit(
    edit: dict[str, Any],
    keys: tuple[str, ...],
    root: Path,
    base: Path,
    artifacts: Path,
    where: str,
) -> dict[str, Any]:
    """A copy of ``edit`` whose ``keys`` (artifact ids on the server, or paths) lie under root."""
    edit = dict(edit)
    for key in keys:
        value = edit.get(key)
        if isinstance(value, str) and value:
            field = f"{where}.{key}"
            if _ID.match(value) and (artifacts / value).is_dir():
                edit[key] = str(confine_from(root, artifacts, value, field=field))
            else:
                edit[key] = str(confine_from(root, base, value, field=field))
    return edit


def _is_builtin(value: str) -> bool:
    """A built-in data set: ``strongreject`` or ``recipes:NAME`` with NAME a plain file name."""
    if value in _BUILTIN_DATA:
        return True
    return value.startswith("recipes:") and bool(_ID.match(value.removeprefix("recipes:")))


def hide_root(text: str, root: Path) -> str:
    """``text`` with the models root's absolute path taken out: a path under the root appears
    relative to it, the root itself as ``.``. Error details and job results reach clients, who
    name paths relative to the root and need not learn where it is on the server."""
    for prefix in sorted({str(root.resolve()), str(root.absolute())}, key=len, reverse=True):
        text = text.replace(prefix + os.sep, "")
        # the root itself, where its path ends (not the start of /srv/models2)
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", ".", text)
    return text


@contextmanager
def root_hidden(root: Path) -> Iterator[None]:
    """Re-raise a :class:`~steer.errors.SteerError` with :func:`hide_root` applied to its
    message (libraries name the absolute paths the server handed them)."""
    try:
        yield
    except SteerError as error:
        error.message = hide_root(error.message, root)
        raise
