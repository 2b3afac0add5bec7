"""Streaming safetensors I/O: read one tensor at a time, write shards tensor by tensor.

Neither side maps or loads a whole file. The reader parses the header and reads each tensor's
bytes with ``readinto`` into a fresh buffer; the writer writes the header first (every tensor's
dtype and shape is known before any data is), then the tensors in header order. Bytes that are
unchanged (:class:`SourceBytes`) are copied file to file in the kernel.

Both sides hash as the bytes go by, so a bake needs no second pass over either file: each file's
``blake3-tensors`` digest (:mod:`steer.digests`) is built from one BLAKE3 leaf per tensor. The
reader feeds a tensor's leaf from reads of its rows in order (and, for the weight hash, a hash of
the rounded values where they are not the stored bytes); the writer feeds a leaf per tensor
written, or takes the source tensor's leaf for a tensor copied unchanged. Hashing runs on
background threads (:mod:`steer.bake.hashing`). Peak memory is one tensor plus the hash queue.

File layout (safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the data, each tensor's bytes in row-major order.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy
import torch

from steer import digests
from steer.bake.hashing import BackgroundHash, OrderedHash
from steer.errors import InvalidArgumentError, ResourceExhaustedError

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_CODES.items()}


#: copy_file_range errors that mean "not between these files": write the bytes instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}

#: bytes per write() call (see ShardWriter._write_all)
WRITE_BYTES = 256 << 10

#: a writer asks the kernel to start writing its file to disk every this many bytes
WRITEBACK_BYTES = 8 << 20


def _sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages in the range; do not wait


def start_writeback(fileno: int, begin: int, end: int) -> bool:
    """Ask the kernel to start writing bytes ``begin:end`` of a file to disk without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a hint, not a flush: the fsync at the
    end is what makes the file durable. Returns False where there is no such call, so the
    caller stops asking."""
    if _SYNC_FILE_RANGE is None:
        return False
    return _SYNC_FILE_RANGE(fileno, begin, end - begin, _SYNC_FILE_RANGE_WRITE) == 0


#: for a tensor, what the weight hash reads from its raw bytes (values rounded to bfloat16), or
#: None where that is the stored bytes themselves (bf16: the tensor's leaf is its weight digest)
TensorBytes = Callable[["TensorSpec"], Callable[[memoryview], memoryview] | None]

#: opens a file for binary writing; tests pass one that fails to simulate a full disk
Opener = Callable[[Path], BinaryIO]


def default_opener(path: Path) -> BinaryIO:
    # unbuffered: tensors are written in large pieces, and kernel-side copies (SourceBytes) go
    # through the same file position
    return path.open("wb", buffering=0)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in memory that numpy allocates, for the bake's outputs.

    numpy asks the kernel to back large arrays with transparent huge pages (``madvise``, the
    usual THP setting), so filling the tensor faults once per 2 MiB rather than per 4 KiB page as
    with ``torch.empty``. Measured on the Qwen 0.5B bake (2 cores): about 47,000 page faults
    became 9,000, and the bake used about 0.15 CPU s less. Read buffers come from numpy too.
    """
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(numpy.empty(nbytes, numpy.uint8)).view(dtype).reshape(shape)


@dataclass(frozen=True, eq=False)
class SourceBytes:
    """Raw bytes read from a source file, with where they lie in it: a writer copies the range
    file to file in the kernel (``copy_file_range``), as a plain copy does, instead of writing
    ``data`` back out of user space, and hashes ``data`` unless it reuses the source's leaf."""

    data: memoryview
    fileno: int
    offset: int


@dataclass(frozen=True)
class _Entry:
    spec: TensorSpec
    begin: int
    end: int


class SafetensorsReader:
    """Random access to the tensors of one ``.safetensors`` file, one tensor in memory at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = path.open("rb")
            prefix = self._file.read(8)
            (length,) = struct.unpack("<Q", prefix)
            self._header = prefix + self._file.read(length)
            header = json.loads(self._header[8:])
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(
                f"{path} is not a safetensors file: {error}", field="model"
            ) from None
        self.data_start = 8 + length
        self.file_size = path.stat().st_size
        self._lock = threading.Lock()
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPE_CODES:
                raise InvalidArgumentError(
                    f"{path}: tensor {name} has unsupported dtype {info['dtype']}", field="model"
                )
            begin, end = info["data_offsets"]
            spec = TensorSpec(name, DTYPE_CODES[info["dtype"]], tuple(info["shape"]))
            self.entries[name] = _Entry(spec, begin, end)
        # the file's blake3-tensors leaves; the tensor (if any) whose bytes each one is
        self._leaves = digests.safetensors_leaves(self._header, self.file_size) or []
        spans = {
            (self.data_start + e.begin, self.data_start + e.end): n for n, e in self.entries.items()
        }
        self._leaf_tensors = [spans.get(leaf) for leaf in self._leaves]
        # hashes fed by reads (see start_file_hash, start_tensor_hashes)
        self._hash_leaves = False
        self._leaf_hashes: dict[str, OrderedHash] = {}
        self._tensor_bytes: TensorBytes | None = None
        self._tensor_hashes: dict[str, OrderedHash] = {}

    def start_file_hash(self) -> None:
        """Hash the file (blake3-tensors) as a side effect of reading each tensor in order."""
        self._hash_leaves = True

    def file_hash(self) -> str | None:
        """The file's blake3-tensors digest if every tensor's bytes were read in order since
        start_file_hash (in any order of tensors), else None."""
        if not self._hash_leaves or not self._leaves:
            return None
        leaves = []
        for name in self._leaf_tensors:
            leaf = self.stored_digest(name) if name is not None else None
            if leaf is None:  # a tensor not read whole in order, or bytes no tensor owns
                return None
            leaves.append(leaf)
        return digests.tree_root(self._header, self.file_size, leaves)

    def stored_digest(self, name: str) -> bytes | None:
        """BLAKE3 of tensor ``name``'s stored bytes, if they were all read in order since hashing
        started, else None."""
        stream = self._leaf_hashes.get(name)
        return stream.digest() if stream is not None else None

    def start_tensor_hashes(self, tensor_bytes: TensorBytes) -> None:
        """Also hash every floating-point tensor for the weight hash as a side effect of reading
        its rows in order: ``tensor_bytes(spec)`` converts its raw bytes chunk by chunk, or says
        (None) that its stored bytes are hashed as they are, i.e. its leaf."""
        self._tensor_bytes = tensor_bytes
        self._hash_leaves = True

    def tensor_digests(self) -> dict[str, bytes]:
        """The weight-hash digest of each floating-point tensor whose rows were all read in
        order since start_tensor_hashes."""
        if self._tensor_bytes is None:
            return {}
        found: dict[str, bytes | None] = {}
        for name, entry in self.entries.items():
            if not entry.spec.dtype.is_floating_point:
                continue
            stream = self._tensor_hashes.get(name) or self._leaf_hashes.get(name)
            found[name] = stream.digest() if stream is not None else None
        return {name: digest for name, digest in found.items() if digest is not None}

    def _read_at(self, offset: int, size: int, name: str) -> memoryview:
        with self._lock:  # shard threads may share a source file (see write_model)
            return self._read_locked(offset, size, name)

    def _read_locked(self, offset: int, size: int, name: str) -> memoryview:
        buffer = numpy.empty(size, numpy.uint8).data  # uninitialised: readinto fills it
        self._file.seek(offset)
        if self._file.readinto(buffer) != size:
            raise InvalidArgumentError(f"{self.path} is truncated at {name}", field="model")
        if self._hash_leaves and size:
            self._hash_read(name, offset - self.data_start - self.entries[name].begin, buffer)
        return buffer

    def _hash_read(self, name: str, start: int, buffer: memoryview) -> None:
        entry = self.entries[name]
        size = entry.end - entry.begin
        leaf = self._leaf_hashes.get(name)
        if leaf is None:
            leaf = self._leaf_hashes[name] = OrderedHash(size)
        leaf.feed(start, len(buffer), buffer)
        spec = entry.spec
        if self._tensor_bytes is None or not spec.dtype.is_floating_point:
            return
        convert = self._tensor_bytes(spec)
        if convert is None:
            return  # the leaf is the weight digest
        stream = self._tensor_hashes.get(name)
        if stream is None:
            stream = self._tensor_hashes[name] = OrderedHash(size)
        stream.feed(start, len(buffer), lambda: convert(buffer))

    def names_in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda name: self.entries[name].begin)

    def spec(self, name: str) -> TensorSpec:
        return self.entries[name].spec

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        buffer = self._read_at(self.data_start + entry.begin, entry.end - entry.begin, name)
        if not buffer:
            return torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
        return torch.frombuffer(buffer, dtype=entry.spec.dtype).reshape(entry.spec.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension, reading only their bytes."""
        spec = self.entries[name].spec
        buffer = self.read_rows_raw(name, start, stop).data
        rows = (stop - start, *spec.shape[1:])
        if not buffer:
            return torch.empty(rows, dtype=spec.dtype)
        return torch.frombuffer(buffer, dtype=spec.dtype).reshape(rows)

    def read_rows_raw(self, name: str, start: int, stop: int) -> SourceBytes:
        """The bytes of rows ``start:stop`` (a 0-d tensor: its one value) and their offset."""
        entry = self.entries[name]
        shape = entry.spec.shape
        row_bytes = (entry.end - entry.begin) // shape[0] if shape and shape[0] else 0
        if not shape:
            start, stop, row_bytes = 0, 1, entry.end - entry.begin
        offset = self.data_start + entry.begin + start * row_bytes
        buffer = self._read_at(offset, (stop - start) * row_bytes, name)
        return SourceBytes(buffer, self._file.fileno(), offset)

    def close(self) -> None:
        self._file.close()


def _header_bytes(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Writes one safetensors file whose tensors are announced up front, then fed in order.

    Hashes the output as it goes (blake3-tensors, :mod:`steer.digests`): a leaf per tensor, fed
    the bytes written, or taken from the source for a tensor copied unchanged (``write``'s
    ``same_as``). Every :data:`WRITEBACK_BYTES` written it asks the kernel to start writing them
    to disk (:func:`start_writeback`), so the fsync at :meth:`close` waits for little and the
    disk works while the bake computes, as it would not if all the writing waited for the end.
    """

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        opener: Opener = default_opener,
    ) -> None:
        self.path = path
        self.specs = specs
        self._next = 0
        self.size = 0
        self._file = opener(path)
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._header = _header_bytes(specs, metadata or {"format": "pt"})
        # per non-empty tensor: (begin, end) in the file, and its hash or a deferred digest
        self._leaves: list[tuple[int, int, BackgroundHash | Callable[[], bytes | None]]] = []
        self._flushed = 0  # bytes handed to start_writeback
        self._writeback = isinstance(self._file, io.FileIO)
        self._write(self._header)

    def _write(
        self,
        data: bytes | memoryview,
        source: SourceBytes | None = None,
        leaf: BackgroundHash | None = None,
    ) -> None:
        try:
            if source is not None and self._kernel_copy and isinstance(self._file, io.FileIO):
                self._copy_range(source)
            else:
                self._write_all(memoryview(data).cast("B"))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhaustedError(
                    f"no space left writing {self.path.name}: {error.strerror}", field="out_dir"
                ) from error
            raise
        if leaf is not None:
            leaf.update(data)
        self.size += memoryview(data).nbytes

    def _write_all(self, data: memoryview) -> None:
        """Write in pieces of WRITE_BYTES. Measured on the 2-core VM the benchmarks run on, one
        write() of many MiB costs up to 8x the CPU time of the same bytes in 256 KiB writes once
        some hundred MiB are dirty (and never less)."""
        done = 0
        while done < len(data):
            written = self._file.write(data[done : done + WRITE_BYTES])
            done += len(data[done : done + WRITE_BYTES]) if written is None else written

    def _copy_range(self, source: SourceBytes) -> None:
        """Copy ``source``'s range kernel-side; the bytes are those in ``source.data`` (the source
        is only read, never written, by the bake). Where the kernel cannot (another filesystem,
        an old kernel), the rest is written from ``source.data``."""
        done, size = 0, len(source.data)
        while done < size:
            try:
                copied = os.copy_file_range(
                    source.fileno, self._file.fileno(), size - done, source.offset + done
                )
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                copied = 0
            if copied == 0:  # unsupported here, or the source shrank: write what was read
                self._kernel_copy = False
                self._write_all(memoryview(source.data)[done:])
                return
            done += copied

    def write(
        self,
        name: str,
        pieces: Iterable[torch.Tensor | SourceBytes],
        same_as: Callable[[], bytes | None] | None = None,
    ) -> None:
        """Write tensor ``name`` from ``pieces`` whose bytes, concatenated, are the tensor in
        row-major order (e.g. row chunks of a large embedding). ``same_as``: the pieces are a
        source tensor's stored bytes, unchanged, and this gives their BLAKE3 (None if the source
        could not hash them); the writer then does not hash them itself."""
        spec = self.specs[self._next]
        if name != spec.name:
            raise AssertionError(f"expected tensor {spec.name}, got {name}")
        self._next += 1
        begin = self.size
        leaf: BackgroundHash | Callable[[], bytes | None] = same_as or BackgroundHash()
        fed = leaf if isinstance(leaf, BackgroundHash) else None
        written = 0
        for piece in pieces:
            if isinstance(piece, SourceBytes):
                if piece.data:
                    self._write(memoryview(piece.data), piece, fed)
                written += len(piece.data)
                continue
            if piece.dtype != spec.dtype:
                raise AssertionError(f"{name}: piece dtype {piece.dtype} is not {spec.dtype}")
            if piece.numel():
                data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                self._write(data.data, leaf=fed)
                written += data.nbytes
        if written != spec.nbytes:
            raise AssertionError(f"{name}: wrote {written} bytes, expected {spec.nbytes}")
        if written:
            self._leaves.append((begin, self.size, leaf))
        if self._writeback and self.size - self._flushed >= WRITEBACK_BYTES:
            self._writeback = start_writeback(self._file.fileno(), self._flushed, self.size)
            self._flushed = self.size

    def _leaf_digest(
        self, begin: int, end: int, leaf: BackgroundHash | Callable[[], bytes | None]
    ) -> bytes:
        if isinstance(leaf, BackgroundHash):
            return leaf.digest()
        digest = leaf()
        if digest is not None:
            return bytes(digest)
        # the source could not say: hash what was written
        return digests.range_digests(self.path, [(begin, end)])[0]

    def close(self) -> str:
        """Flush and fsync; return the file's blake3-tensors hash (:mod:`steer.digests`)."""
        if self._next != len(self.specs):
            raise AssertionError(
                f"{self.path.name}: {len(self.specs) - self._next} tensors unwritten"
            )
        try:
            self._file.flush()
            os.fsync(self._file.fileno())  # once per file
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhaustedError(
                    f"no space left writing {self.path.name}", field="out_dir"
                ) from error
            raise
        finally:
            self._file.close()
        leaves = [self._leaf_digest(begin, end, leaf) for begin, end, leaf in self._leaves]
        return digests.tree_root(self._header, self.size, leaves)

    def abort(self) -> None:
        self._file.close()
