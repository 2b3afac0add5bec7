"""Content digests of weights and files: BLAKE3.

Every hash steer records over model bytes (the weight hash that ties artifacts to a model, the
file hashes in a bake's provenance) is BLAKE3, 256 bits, as hex. BLAKE3 is a cryptographic hash
like SHA-256 but measured here at 4.3 GB/s on one core against SHA-256's 1.7 GB/s (SHA-NI), and
the bake is CPU-bound on hashing (docs/benchmarks.md). Its updates release the GIL, so hashes fed
from worker threads run in parallel. A recorded file hash can be checked with the ``b3sum`` tool.

Provenance records made before BLAKE3 name SHA-256; :func:`file_digest` still checks them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3

#: the algorithm name recorded beside file hashes (steer_provenance.json ``file_hash``)
ALGORITHM = "blake3"
#: what older provenance records, which name no algorithm, used
LEGACY_ALGORITHM = "sha256"


def new(initial: bytes = b"") -> blake3.blake3:
    """A fresh BLAKE3 hasher (``update``, ``digest``, ``hexdigest``), fed ``initial``."""
    return blake3.blake3(initial)


def file_digest(path: Path, *, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file's bytes."""
    if algorithm == ALGORITHM:
        digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
        digest.update_mmap(path)
        return str(digest.hexdigest())
    if algorithm not in hashlib.algorithms_available:
        raise ValueError(f"unknown hash algorithm {algorithm!r}")
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


__all__ = ["ALGORITHM", "LEGACY_ALGORITHM", "file_digest", "new"]
