"""TOML from outside (recipes, presets, slider files) read into a table, each failure a field error.

``tomllib.loads`` raises ``TOMLDecodeError`` for bad syntax, but reading and parsing a file from
outside can also fail with ``OSError`` (a directory, no permission), ``UnicodeDecodeError`` (TOML
is UTF-8) and ``RecursionError`` (arrays nested thousands deep). :func:`parse_toml` and
:func:`read_toml` turn each of these into one :class:`InvalidArgumentError` naming the field.
"""

from __future__ import annotations

import tomllib
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
