"""Content digests of weights and files: BLAKE3.

Every hash steer records over model bytes (the weight hash that ties artifacts to a model, the
file hashes in a bake's provenance) is BLAKE3, 256 bits, as hex. BLAKE3 is a cryptographic hash
like SHA-256 but measured here at 4.3 GB/s on one core against SHA-256's 1.7 GB/s (SHA-NI), and
the bake is CPU-bound on hashing (docs/benchmarks.md). Its updates release the GIL, so hashes fed
from worker threads run in parallel.

File hashes (:data:`ALGORITHM`, ``blake3-tensors``): a ``.safetensors`` file is hashed as a
two-level tree, every other file as plain BLAKE3 (what ``b3sum`` prints). The tree's leaves are
the BLAKE3 of each tensor's bytes (the byte ranges between consecutive tensor boundaries, see
:func:`safetensors_leaves`); the root is BLAKE3 over a domain tag, the file size, the header
and the leaves in file order. The root is as collision-resistant as BLAKE3 and covers every byte,
but a leaf is also the hash a bf16 tensor's weight hash needs, and an unchanged tensor's leaf is
the same in the source and the output. So a bake hashes each source byte once, and only the
bytes it edits on the output side (docs/bake.md); ``steer bake --verify`` recomputes it.

Provenance records made before ``blake3-tensors`` name ``blake3`` (plain, every file) or nothing
(SHA-256); :func:`file_digest` still checks them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path

import blake3

#: the algorithm name recorded beside file hashes (steer_provenance.json ``file_hash``)
ALGORITHM = "blake3-tensors"
#: plain BLAKE3 of every file: provenance records from before ``blake3-tensors``
PLAIN = "blake3"
#: what older provenance records, which name no algorithm, used
LEGACY_ALGORITHM = "sha256"
#: every algorithm :func:`file_digest` can check
ALGORITHMS = (ALGORITHM, PLAIN, LEGACY_ALGORITHM)

#: the domain tag that starts a safetensors tree root
_TREE_TAG = b"steer.safetensors.tensors.v1\0"


def new(initial: bytes = b"") -> blake3.blake3:
    """A fresh BLAKE3 hasher (``update``, ``digest``, ``hexdigest``), fed ``initial``."""
    return blake3.blake3(initial)


def safetensors_leaves(header: bytes, file_size: int) -> list[tuple[int, int]] | None:
    """The leaves of a safetensors file: the byte ranges ``[begin, end)`` (file offsets) that
    split its data region at every tensor boundary, in file order. ``header`` is the file's
    first ``8 + N`` bytes (length, JSON). None when it is not a parseable safetensors header."""
    try:
        (length,) = struct.unpack("<Q", header[:8])
        if len(header) != 8 + length or 8 + length > file_size:
            return None
        table = json.loads(header[8:])
        start = 8 + length
        cuts = {start, file_size}
        for name, info in table.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            cuts.update(min(file_size, start + int(offset)) for offset in (begin, end))
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        return None
    bounds = sorted(cut for cut in cuts if cut >= start)
    return [(begin, end) for begin, end in itertools.pairwise(bounds) if end > begin]


def tree_root(header: bytes, file_size: int, leaves: Iterable[bytes]) -> str:
    """The ``blake3-tensors`` digest of a safetensors file from its header and leaf digests."""
    digest = blake3.blake3(_TREE_TAG)
    digest.update(struct.pack("<Q", file_size))
    digest.update(header)
    for leaf in leaves:
        digest.update(leaf)
    return str(digest.hexdigest())


def _read_header(path: Path) -> bytes:
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return prefix
        (length,) = struct.unpack("<Q", prefix)
        return prefix + handle.read(min(length, 100 << 20))


def tensors_digest(path: Path) -> str:
    """The ``blake3-tensors`` digest of a file (plain BLAKE3 unless it is safetensors)."""
    size = path.stat().st_size
    header = _read_header(path) if path.suffix == ".safetensors" else b""
    leaves = safetensors_leaves(header, size) if header else None
    if leaves is None:
        return _plain(path)
    return tree_root(header, size, range_digests(path, leaves))


def range_digests(path: Path, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """BLAKE3 of each byte range ``[begin, end)`` of a file (a tree's leaves), read through one
    memory mapping."""
    ranges = list(ranges)
    if not ranges:
        return []
    found = []
    with (
        path.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        memoryview(mapped) as view,
    ):
        for begin, end in ranges:
            leaf = blake3.blake3(max_threads=blake3.blake3.AUTO)
            leaf.update(view[begin:end])
            found.append(bytes(leaf.digest()))
    return found


def _plain(path: Path) -> str:
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    digest.update_mmap(path)
    return str(digest.hexdigest())


def file_digest(path: Path, *, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file under ``algorithm`` (one of :data:`ALGORITHMS`)."""
    if algorithm == ALGORITHM:
        return tensors_digest(path)
    if algorithm == PLAIN:
        return _plain(path)
    if algorithm != LEGACY_ALGORITHM:
        raise ValueError(f"unknown hash algorithm {algorithm!r}")
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "LEGACY_ALGORITHM",
    "PLAIN",
    "file_digest",
    "new",
    "range_digests",
    "safetensors_leaves",
    "tensors_digest",
    "tree_root",
]
