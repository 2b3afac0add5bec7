"""``steer_provenance.json``: how a baked output was made, and re-hash verification."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steer import digests
from steer.errors import FailedPreconditionError, NotFoundError, OutputExistsError, SteerError

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


def is_bake_output(path: Path) -> bool:
    """Whether ``path`` holds what a steer bake wrote and nothing else, so replacing it loses
    nothing else: a directory whose ``steer_provenance.json`` (format ``steer.bake``) records
    every other entry in it (model and LoRA outputs are flat), or a llama.cpp control vector that
    carries steer's provenance. A symbolic link is never one: replacing it would rename the link.
    """
    if path.is_symlink():
        return False
    if path.is_dir():
        return _is_bake_directory(path)
    if path.is_file():
        return _is_steer_control_vector(path)
    return False


def _is_bake_directory(directory: Path) -> bool:
    try:
        record = json.loads((directory / PROVENANCE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return False
    recorded = record.get("files")
    if not isinstance(recorded, dict):
        return False
    for entry in directory.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return False  # a subdirectory or link: something a bake did not write
        if entry.name != PROVENANCE and entry.name not in recorded:
            return False
    return True


def _is_steer_control_vector(path: Path) -> bool:
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            return False  # not parsed further: any large file would be opened otherwise
    from steer.bake.control_vector import read_control_vector

    try:
        _vector, metadata = read_control_vector(path)
    except (SteerError, ValueError, OSError):
        return False
    return "provenance" in metadata


def check_target(
    target: Path,
    overwrite: bool,
    *,
    directory: bool,
    shown: str | None = None,
    field: str = "out_dir",
) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` and it is a previous steer bake output
    of the same kind (``directory`` for a model or LoRA, else a control-vector file).
    ``shown`` is the target as messages name it."""
    if not (target.exists() or target.is_symlink()):
        return
    shown = shown or str(target)
    if not overwrite:
        raise OutputExistsError(
            f"{shown} already exists; pass overwrite (--overwrite) to replace it", field=field
        )
    if not is_bake_output(target) or target.is_dir() != directory:
        kind = "model or LoRA directory" if directory else "control-vector file"
        raise FailedPreconditionError(
            f"{shown} is not a previous steer bake output (a {kind} with its {PROVENANCE} and "
            "nothing else); overwrite only replaces those",
            field=field,
        )


# ---------------------------------------------------------------------------------------------
# Temporaries: ``.NAME.steer-tmp-PID-XXXXXXXX`` beside the target

_TEMPORARY = re.compile(r"\..+\.steer-tmp-(\d+)-[0-9a-f]{8}")
#: names of the temporaries this process is writing now; a stale one may carry this process's
#: PID when a container restarts the server under the PID its killed predecessor had
_OWN_TEMPORARIES: set[str] = set()
_OWN_LOCK = threading.Lock()


def _temporary_name(target: Path) -> Path:
    temp = target.parent / f".{target.name}.steer-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with _OWN_LOCK:
        _OWN_TEMPORARIES.add(temp.name)
    return temp


def _release(temp: Path) -> None:
    with _OWN_LOCK:
        _OWN_TEMPORARIES.discard(temp.name)


def is_stale_temporary(path: Path) -> bool:
    """A bake temporary whose writer is gone: its process has exited (or it is one of this
    process's PID that this process is not writing)."""
    match = _TEMPORARY.fullmatch(path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        with _OWN_LOCK:
            return path.name not in _OWN_TEMPORARIES
    return not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) sends CTRL_C there; nothing is removed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False  # no process has such a PID
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Remove the stale bake temporaries (see :func:`is_stale_temporary`) in ``directory``,
    e.g. a killed bake's partial output (up to the model's size); returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if is_stale_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_stale_under(root: Path) -> list[Path]:
    """:func:`remove_stale` in ``root`` and every directory below it (links not followed): a
    server starting after a crash clears what its killed bakes left."""
    removed = []
    for directory, subdirectories, _files in os.walk(root):
        removed.extend(remove_stale(Path(directory)))
        # nothing to look for inside a temporary, removed or a live bake's
        subdirectories[:] = [name for name in subdirectories if not _TEMPORARY.fullmatch(name)]
    return removed


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success fsync it and rename it to
    ``target``; on any error (or interruption) remove it. ``target`` never holds a partial
    output. Stale temporaries of killed bakes in the same directory are removed first."""
    check_target(target, overwrite, directory=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    temp = _temporary_name(target)
    try:
        temp.mkdir()
        yield temp
        fsync_path(temp)
        check_target(target, overwrite, directory=True)  # it may have appeared meanwhile
        _replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        _release(temp)


def _replace(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``, moving a previous output aside first and deleting it
    after (a kill in between leaves it as a stale temporary, never a missing target)."""
    old = None
    if target.exists():
        old = _temporary_name(target)
        os.rename(target, old)
    try:
        try:
            os.rename(temp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # the previous output stays where it was
            raise
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if old is not None:
            _release(old)


@contextmanager
def atomic_file(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file."""
    check_target(target, overwrite, directory=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    temp = _temporary_name(target)
    try:
        yield temp
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        check_target(target, overwrite, directory=False)
        os.replace(temp, target)
        fsync_path(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        _release(temp)
