"""TOML from outside (recipes, presets, slider files) read into a table, each failure a field error.

``tomllib.loads`` raises ``TOMLDecodeError`` for bad syntax, but reading and parsing a file from
outside can also fail with ``OSError`` (a directory, no permission), ``UnicodeDecodeError`` (TOML
is UTF-8) and ``RecursionError`` (arrays nested thousands deep). :func:`parse_toml` and
:func:`read_toml` turn each of these into one :class:`InvalidArgumentError` naming the field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Set
from dataclasses import fields
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError


def parse_toml(text: str, *, what: str, field: str) -> dict[str, Any]:
    """``text`` as a TOML table; ``what`` names it in the message (``"{what}: {reason}"``)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        reason = str(error)
    except RecursionError:
        reason = "nested too deeply"
    raise InvalidArgumentError(f"{what}: {reason}", field=field)


def read_toml(path: Path, *, field: str) -> dict[str, Any]:
    """The TOML file ``path`` as a table (messages name the file). Whether it exists is the
    caller's to check first: each says in its own words what a missing file means."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InvalidArgumentError(
            f"{path}: cannot be read ({error.strerror or error})", field=field
        ) from None
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(
            f"{path}: not UTF-8 text (byte {error.start})", field=field
        ) from None
    return parse_toml(text, what=str(path), field=field)


_ITEM_NAMES = {int: "integers", float: "numbers", str: "strings"}


def typed_list(value: Any, item: type, where: str) -> tuple[Any, ...]:
    """A TOML array whose items are all ``item`` (int, float or str; a bool is none of them, an
    int is a float) as a tuple, else an error naming the field ``where``."""

    def fits(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        return isinstance(v, int | float) if item is float else isinstance(v, item)

    if not isinstance(value, list | tuple) or not all(fits(v) for v in value):
        raise InvalidArgumentError(
            f"expected a list of {_ITEM_NAMES[item]}, got {value!r}", field=where
        )
    return tuple(float(v) for v in value) if item is float else tuple(value)


def typed_table(
    cls: type,
    raw: Any,
    name: str,
    *,
    list_items: Mapping[str, type],
    one_or_list: Set[str] = frozenset(),
) -> Any:
    """The dataclass ``cls`` (every field defaulted) from the TOML table ``raw`` named ``name``:
    unknown fields and values not of the field's default's type are errors naming
    ``name.field``; an int is a float, a bool is neither; a tuple field is a list of
    ``list_items[field]``, and for a field in ``one_or_list`` a plain string is a list of that one
    string ("" = none)."""
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError("must be a table", field=name)
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise InvalidArgumentError(f"unknown fields {sorted(unknown)}", field=name)
    values = {}
    defaults = cls()
    for key, value in raw.items():
        expected = type(getattr(defaults, key))
        where = f"{name}.{key}"
        if expected is tuple:
            if key in one_or_list and isinstance(value, str):
                value = [value] if value else []
            value = typed_list(value, list_items[key], where)
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgumentError(f"expected a number, got {value!r}", field=where)
            value = float(value)
        elif expected is bool:
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"expected true or false, got {value!r}", field=where)
        elif expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"expected an integer, got {value!r}", field=where)
        elif not isinstance(value, expected):
            raise InvalidArgumentError(f"expected {expected.__name__}, got {value!r}", field=where)
        values[key] = value
    return cls(**values)
