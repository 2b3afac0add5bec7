"""User-supplied paths stay inside the models root: no absolute paths, ``..`` or symlink escapes."""

from __future__ import annotations

import re
from pathlib import Path

from steer.errors import InvalidArgumentError, NotFoundError

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
    resolved = (base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise InvalidArgumentError(f"{relative!r} leaves the models root", field=field)
    if must_exist and not resolved.exists():
        raise NotFoundError(f"{relative!r} does not exist under the models root", field=field)
    return resolved


def check_id(value: str, *, field: str) -> str:
    """An id that is a single safe directory name (letters, digits, '.', '_', '-')."""
    if not _ID.match(value) or value in (".", ".."):
        raise InvalidArgumentError(
            f"invalid id {value!r}: use 1-128 letters, digits, '.', '_' or '-', not starting "
            "with '.', '_' or '-'",
            field=field,
        )
    return value
