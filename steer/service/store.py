"""Vector artifacts on the server: ``<models root>/artifacts/<id>/`` (steer.artifacts format)."""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.artifacts import SIDECAR, TENSORS, VectorArtifact, check_model, load_vector
from steer.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SteerError,
)
from steer.models import ModelHandle
from steer.service.paths import check_id, hide_root, is_id


@dataclass(frozen=True)
class ArtifactFiles:
    artifact_id: str
    vectors_safetensors: bytes
    steer_json: bytes


class ArtifactStore:
    """Lists, reads, validates and writes artifacts; loaded vectors are cached by file mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[int, VectorArtifact]] = {}
        self._lock = threading.Lock()

    def path(self, artifact_id: str, field: str = "artifact_id") -> Path:
        check_id(artifact_id, field=field)
        directory = self.root / artifact_id
        if directory.is_symlink():
            raise NotFoundError(f"artifact {artifact_id!r} is a link; not served", field=field)
        return directory

    def hide_paths(self, directory: Path, models_root: Path) -> None:
        """Rewrite the sidecar of an artifact the server just computed with every path under
        ``models_root`` relative to it: the library records the absolute data paths it was
        handed, and whoever downloads the artifact need not learn where the root is."""
        sidecar = directory / SIDECAR
        if not sidecar.is_file():
            return
        text = sidecar.read_text()
        hidden = hide_root(text, models_root)
        if hidden == text:
            return
        temporary = sidecar.with_name(f".{SIDECAR}.{secrets.token_hex(4)}.tmp")
        temporary.write_text(hidden)
        temporary.replace(sidecar)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if is_id(p.name) and p.is_dir() and not p.is_symlink() and (p / SIDECAR).exists()
        )

    def load(self, artifact_id: str, field: str = "artifact_id") -> VectorArtifact:
        """The artifact ``artifact_id``; a broken one raises FailedPreconditionError (``field``)."""
        directory = self.path(artifact_id, field)
        sidecar = directory / SIDECAR
        if not sidecar.exists():
            raise NotFoundError(f"no artifact {artifact_id!r} on this server", field=field)
        stamp = sidecar.stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(artifact_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            artifact = load_vector(directory, where=f"artifact {artifact_id!r}")
        except SteerError as error:  # what is on disk is wrong, not the request
            raise FailedPreconditionError(
                f"{error.message}; the artifact is broken (replace it: Upload with overwrite)",
                field=field,
            ) from None
        with self._lock:
            self._cache[artifact_id] = (stamp, artifact)
        return artifact

    def load_for(
        self, artifact_id: str, handle: ModelHandle, *, allow_other_model: bool, field: str
    ) -> VectorArtifact:
        try:
            artifact = self.load(artifact_id, field)
            check_model(
                artifact.metadata,
                handle,
                allow_other_model=allow_other_model,
                where=f"artifact {artifact_id!r}",
            )
        except SteerError as error:
            error.field = field  # name the request's field, not the artifact module's
            raise
        return artifact

    def files(self, artifact_id: str) -> ArtifactFiles:
        """The files of an artifact that loads (a broken one raises as :meth:`load` does)."""
        self.load(artifact_id)
        directory = self.path(artifact_id)
        try:
            tensors = (directory / TENSORS).read_bytes()
            sidecar = (directory / SIDECAR).read_bytes()
        except OSError as error:  # replaced or removed since it loaded
            raise FailedPreconditionError(
                f"artifact {artifact_id!r} cannot be read ({error.strerror}); try again",
                field="artifact_id",
            ) from None
        return ArtifactFiles(artifact_id, tensors, sidecar)

    def upload(self, files: ArtifactFiles, *, overwrite: bool) -> VectorArtifact:
        """Write to a temporary directory, validate by loading and describing, then move into
        place; nothing lands unless all of that passed."""
        target = self.path(files.artifact_id, "files.artifact_id")
        if target.exists() and not overwrite:
            raise _exists(files.artifact_id)
        self.root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            (temp / TENSORS).write_bytes(files.vectors_safetensors)
            (temp / SIDECAR).write_bytes(files.steer_json)
            artifact = _validate_upload(temp, files.artifact_id)
            with self._lock:
                if target.exists():
                    if not overwrite:  # another upload of this id won the race
                        raise _exists(files.artifact_id)
                    shutil.rmtree(target)
                temp.rename(target)
                self._cache.pop(files.artifact_id, None)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
        return artifact

    def delete(self, artifact_id: str) -> bool:
        """Remove the artifact ``artifact_id`` (a broken one too); True if it was broken.

        The directory is first renamed to a hidden temporary name beside it, so it leaves every
        listing at once and a concurrent Delete of the same id finds nothing (NOT_FOUND); only
        then is it removed. A link under the store is refused by :meth:`path`, and links inside
        the directory are unlinked, never followed."""
        directory = self.path(artifact_id)
        if not directory.is_dir():
            raise NotFoundError(f"no artifact {artifact_id!r} on this server", field="artifact_id")
        try:
            self.load(artifact_id)
            broken = False
        except (FailedPreconditionError, NotFoundError):  # broken, or no steer.json at all
            broken = True
        doomed = self.root / f".delete-{artifact_id}-{secrets.token_hex(4)}"
        with self._lock:
            try:
                directory.rename(doomed)
            except FileNotFoundError:  # another Delete took it first
                raise NotFoundError(
                    f"no artifact {artifact_id!r} on this server", field="artifact_id"
                ) from None
            self._cache.pop(artifact_id, None)
        shutil.rmtree(doomed, ignore_errors=True)
        return broken

    @staticmethod
    def describe(artifact: VectorArtifact) -> dict[str, Any]:
        metadata = dict(artifact.metadata)
        return {
            "kind": artifact.kind,
            "d_model": artifact.vector.d_model,
            "layers": list(artifact.vector.layers),
            "has_shared": artifact.vector.shared is not None,
            "model_name": str((metadata.get("model") or {}).get("name", "")),
            "metadata_json": json.dumps(metadata, sort_keys=True, default=str),
        }


def _exists(artifact_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"artifact {artifact_id!r} exists; set overwrite", field="files.artifact_id"
    )


def _validate_upload(directory: Path, artifact_id: str) -> VectorArtifact:
    """The uploaded files as an artifact, read and described the way List, Get and Generate
    will; a fault names the file (``files.steer_json.model``), not the temporary directory."""
    try:
        artifact = load_vector(directory, where=f"uploaded artifact {artifact_id!r}")
        ArtifactStore.describe(artifact)
    except SteerError as error:
        field = f"files.{error.field}" if error.field else "files"
        raise InvalidArgumentError(error.message, field=field) from None
    return artifact
