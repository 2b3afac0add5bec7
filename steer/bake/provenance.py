"""``steer_provenance.json``: how a baked output was made, and re-hash verification."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steer import digests
from steer.errors import FailedPreconditionError, NotFoundError

PROVENANCE = "steer_provenance.json"
FORMAT = "steer.bake"
FORMAT_VERSION = 1


def record(
    *,
    output_format: str,
    source: dict[str, Any],
    recipe: dict[str, Any],
    directions: dict[str, Any],
    files: dict[str, str],
    notes: list[str],
) -> dict[str, Any]:
    from steer import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "steer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command_line": list(sys.argv),
        "output_format": output_format,
        "source": source,
        "recipe": recipe,
        "directions": directions,
        "notes": notes,
        "file_hash": digests.ALGORITHM,
        "files": dict(sorted(files.items())),
    }


def write(directory: Path, provenance: dict[str, Any]) -> None:
    path = directory / PROVENANCE
    with path.open("w") as handle:
        json.dump(provenance, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())


def verify(directory: str | Path) -> list[str]:
    """Re-hash every recorded file; return the problems (empty when the output is intact)."""
    directory = Path(directory)
    path = directory / PROVENANCE
    if not path.exists():
        raise NotFoundError(f"{directory} has no {PROVENANCE}", field="out_dir")
    try:
        provenance = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return [f"{PROVENANCE} is not valid JSON: {error}"]
    problems = []
    recorded: dict[str, str] = provenance.get("files", {})
    algorithm = provenance.get("file_hash", digests.LEGACY_ALGORITHM)
    if algorithm not in digests.ALGORITHMS:
        return [f"{PROVENANCE} names an unknown file hash {algorithm!r}"]
    for name, expected in recorded.items():
        file = directory / name
        if not file.exists():
            problems.append(f"missing: {name}")
        elif digests.file_digest(file, algorithm=algorithm) != expected:
            problems.append(f"hash mismatch: {name}")
    for file in sorted(directory.rglob("*")):
        name = file.relative_to(directory).as_posix()
        if file.is_file() and name != PROVENANCE and name not in recorded:
            problems.append(f"not recorded: {name}")
    return problems


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary_name(target: Path) -> Path:
    return target.parent / f".{target.name}.steer-tmp-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale(target: Path) -> None:
    """Remove temporary outputs beside ``target`` left by bakes whose process is gone (killed)."""
    for stale in target.parent.glob(f".{target.name}.steer-tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise FailedPreconditionError(
            f"{target} already exists; pass overwrite (--overwrite) to replace it", field="out_dir"
        )


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success fsync it and rename it to
    ``target``; on any error (or interruption) remove it. ``target`` never holds a partial
    output."""
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    temp = _temporary_name(target)
    temp.mkdir()
    try:
        yield temp
        fsync_path(temp)
        check_target(target, overwrite)
        old = None
        if target.exists():
            old = _temporary_name(target)
            os.rename(target, old)
        os.rename(temp, target)
        fsync_path(target.parent)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file."""
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary_name(target)
    try:
        yield temp
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        check_target(target, overwrite)
        os.replace(temp, target)
        fsync_path(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
