"""JSON values of a request body read with the client's key named: numbers, integers, counts,
booleans, strings and lists of them, and the check that every string is Unicode text.

The readers keep their leading underscore (:data:`steer.http.samplers.SAMPLER_FIELDS` names them
as converters, and the HTTP fuzzer picks hostile values by their names); ``__all__`` lists them
as this module's interface to :mod:`steer.http.fields` and :mod:`steer.http.samplers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from steer.errors import InvalidArgumentError
from steer.json_input import json_type
from steer.limits import finite

__all__ = [
    "MAX_TOKEN_ID",
    "_boolean",
    "_bounded",
    "_count",
    "_first",
    "_flag",
    "_integer",
    "_number",
    "_seed",
    "_sequence_breakers",
    "_string_list",
    "_strings",
    "_top_k",
    "_whole_context",
    "check_unicode",
]

#: largest integer any integer field accepts (seeds are 64-bit downstream)
_MAX_INTEGER = 2**63 - 1
#: largest count (token counts, windows, top_k, modes: uint32 in the GenerateRequest proto)
_MAX_COUNT = 2**32 - 1
#: largest token id (every vocabulary indexes with int32)
MAX_TOKEN_ID = 2**31 - 1


def check_unicode(body: Mapping[str, Any]) -> None:
    """Refuse a body with a string (or key) that is not Unicode text: JSON's ``\\ud800`` escape
    of an unpaired surrogate parses, but no tokenizer, protobuf or UTF-8 encoder takes it."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            _encodable(value, path or "body")
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                name = _printable(key)
                child = f"{path}.{name}" if path else name
                _encodable(key, child)
                pending.append((child, item))


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = _printable(text[error.start : error.end])
        raise InvalidArgumentError(
            f"is not Unicode text: an unpaired surrogate ({bad}) at character {error.start}",
            field=field,
        ) from None


def _first(body: Mapping[str, Any], names: Iterable[str]) -> tuple[str, Any] | None:
    """The first of ``names`` (canonical first) present and not null, with its value."""
    for name in names:
        value = body.get(name)
        if value is not None:
            return name, value
    return None


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"must be a number, not {json_type(value)}", field=key)
    return finite(value, key)


def _integer(key: str, value: Any) -> int:
    """An integer; a float with an integral value is accepted (some clients send ``40.0``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"must be an integer, got {value!r}", field=key)
    if abs(value) > _MAX_INTEGER:
        raise InvalidArgumentError("is too large", field=key)
    return value


def _count(key: str, value: Any) -> int:
    """An integer that travels as a uint32 (negative ones are SamplingConfig's to refuse)."""
    count = _integer(key, value)
    if count > _MAX_COUNT:
        raise InvalidArgumentError(f"is too large: at most {_MAX_COUNT}, got {count}", field=key)
    return count


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"must be true or false, got {value!r}", field=key)
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    found = _first(body, (key,))
    return _boolean(key, found[1]) if found else False


def _bounded(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    found = _first(body, (key,))
    if found is None:
        return default
    value = _integer(key, found[1])
    if not low <= value <= high:
        raise InvalidArgumentError(f"must be in [{low}, {high}], got {value}", field=key)
    return value


def _whole_context(key: str, value: Any) -> int:
    """A token window where -1 (llama.cpp) and 0 (text-generation-webui) mean everything."""
    window = _count(key, value)
    if window < -1:
        raise InvalidArgumentError(f"must be -1, 0 or a token count, got {window}", field=key)
    return max(window, 0)


def _top_k(key: str, value: Any) -> int:
    top_k = _count(key, value)
    return 0 if top_k == -1 else top_k


def _seed(key: str, value: Any) -> int | None:
    seed = _integer(key, value)
    return None if seed == -1 else seed


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings; empty strings dropped, duplicates dropped."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidArgumentError(f"must be a list of strings, not {json_type(value)}", field=key)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidArgumentError(
                f"must be a string, not {json_type(item)}", field=f"{key}[{index}]"
            )
    return tuple(dict.fromkeys(item for item in items if item))


def _sequence_breakers(key: str, value: Any) -> tuple[str, ...]:
    """DRY breakers: a list, or text as ST and text-generation-webui send it (a JSON array,
    JSON strings without the brackets, or failing both, comma-separated as ST splits it)."""
    if not isinstance(value, str):
        return _string_list(key, value)
    text = value.strip()
    bracketed = text.startswith("[")
    try:
        parsed = json.loads(text if bracketed else f"[{text}]")
    except (ValueError, RecursionError):
        if bracketed:
            raise InvalidArgumentError("must be a JSON array of strings", field=key) from None
        return tuple(dict.fromkeys(part for part in text.split(",") if part))
    if not all(isinstance(item, str) for item in parsed):
        raise InvalidArgumentError("must be a JSON array of strings", field=key)
    for index, item in enumerate(parsed):
        _encodable(item, f"{key}[{index}]")  # JSON inside the string: not checked with the body
    return tuple(dict.fromkeys(item for item in parsed if item))


def _strings(body: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    found = _first(body, names)
    return _string_list(*found) if found else ()
