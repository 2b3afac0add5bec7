"""JSON that comes from outside (sidecars, SAE configs, roleplay scenes) parsed into an object.

``json.loads`` on untrusted text raises more than ``JSONDecodeError``: ``UnicodeDecodeError``,
``ValueError`` for an integer of more than 4300 digits, ``RecursionError`` for deep nesting; and a
document that parses may still be a list or ``null``. :func:`parse_object` turns all of these
into one :class:`InvalidArgumentError` naming the field, and bounds the nesting so that whatever
it returns can be walked and written back (``json.dumps``) without hitting the recursion limit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError

#: deepest nesting of lists and objects accepted (steer's own files nest three or four levels)
MAX_DEPTH = 64


def parse_object(source: str | bytes, *, what: str, field: str) -> dict[str, Any]:
    """``source`` (text, or UTF-8 bytes) as a JSON object; ``what`` names it in messages."""
    try:
        text = source.decode("utf-8") if isinstance(source, bytes) else source
        value = json.loads(text)
    except RecursionError:
        raise InvalidArgumentError(f"{what} nests too deeply to read", field=field) from None
    except ValueError as error:  # also UnicodeDecodeError and JSONDecodeError
        raise InvalidArgumentError(f"{what} is not valid JSON: {error}", field=field) from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"{what} must be a JSON object, not {json_type(value)}", field=field
        )
    if depth(value) > MAX_DEPTH:
        raise InvalidArgumentError(
            f"{what} nests lists and objects more than {MAX_DEPTH} levels deep", field=field
        )
    return value


def read_object(path: Path, *, what: str, field: str) -> dict[str, Any]:
    """The JSON file ``path`` as an object (see :func:`parse_object`); a file that cannot be
    read is the same :class:`InvalidArgumentError`. ``what`` names it in messages."""
    try:
        source = path.read_bytes()
    except OSError as error:
        raise InvalidArgumentError(
            f"{what} cannot be read ({error.strerror})", field=field
        ) from None
    return parse_object(source, what=what, field=field)


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (0 for a scalar); without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in item)
    return deepest


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__)
