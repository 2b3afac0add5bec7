"""Streaming safetensors I/O: read one tensor at a time, write shards tensor by tensor.

Neither side maps or loads a whole file. The reader parses the header and reads each tensor's
bytes with ``readinto`` into a fresh buffer, optionally hashing the file and each tensor as the
reads go by in order; the writer writes the header first (every tensor's dtype and shape is known
before any data is), then the tensors in header order, hashing the bytes as they go so the
output's hash costs no second read. Bytes that are unchanged (:class:`SourceBytes`) are copied
file to file in the kernel; their read buffer is what gets hashed. Hashing runs on background
threads (:class:`HashWorkers`). Peak memory is one tensor plus the hash queue.

File layout (safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the data, each tensor's bytes in row-major order.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy
import torch

from steer import digests
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


class HashWorkers:
    """Threads that run hash updates (BLAKE3 releases the GIL on large buffers), holding at
    most ``max_queued`` bytes of buffers queued: past that, ``submit`` waits for the oldest."""

    def __init__(self, threads: int = 2, max_queued: int = 96 << 20) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="steer-hash")
        self._queue: deque[tuple[Future[None], int]] = deque()
        self._queued = 0
        self._max_queued = max_queued
        self._lock = threading.Lock()

    def submit(self, digest: Any, data: bytes | bytearray | memoryview, size: int) -> Future[None]:
        future = self._pool.submit(digest.update, data)
        with self._lock:
            self._queue.append((future, size))
            self._queued += size
        while True:
            with self._lock:
                while self._queue and self._queue[0][0].done():
                    self._queued -= self._queue.popleft()[1]
                if self._queued <= self._max_queued or not self._queue:
                    return future
                oldest, oldest_size = self._queue.popleft()
                self._queued -= oldest_size
            wait([oldest])


#: shared by every hash of every bake in this process: the machine has few cores to hash on
HASH_WORKERS = HashWorkers()


class BackgroundHash:
    """A BLAKE3 hash (:mod:`steer.digests`) fed from :class:`HashWorkers`, so hashing overlaps
    reading, editing and writing.

    The updates of one hash run in order, one in flight at a time; many hashes run at once (the
    source file, each source tensor, the output file). A buffer passed in must not change until
    its update has run; the bake never writes to a buffer once it has been read or written.
    """

    def __init__(self, initial: bytes = b"", workers: HashWorkers = HASH_WORKERS) -> None:
        self._digest = digests.new(initial)
        self._workers = workers
        self._pending: Future[None] | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._wait()
        size = memoryview(data).nbytes
        if size < 4096:  # too small to release the GIL: a thread hop costs more than the hash
            self._digest.update(data)
        else:
            self._pending = self._workers.submit(self._digest, data, size)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def digest(self) -> bytes:
        self._wait()
        return self._digest.digest()

    def hexdigest(self) -> str:
        self._wait()
        return self._digest.hexdigest()


#: copy_file_range errors that mean "not between these files": write the bytes instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}

#: bytes per write() call (see ShardWriter._write_all)
WRITE_BYTES = 256 << 10

#: the bytes hashed for a tensor's raw bytes (the weight hash rounds values to bfloat16)
TensorBytes = Callable[["TensorSpec", memoryview], memoryview]

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


@dataclass(frozen=True, eq=False)
class SourceBytes:
    """Raw bytes read from a source file, with where they lie in it: a writer hashes ``data``
    and copies the same range file to file in the kernel (``copy_file_range``), as a plain copy
    does, instead of writing ``data`` back out of user space."""

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
        # the file's hash, fed by reads that happen to be sequential (see file_hash)
        self._digest: Any = None
        self._position = 0
        # per-tensor hashes of a transform of the bytes, fed by reads in row order (see
        # start_tensor_hashes); a tensor's position is -1 once a read skipped some of its rows
        self._tensor_bytes: TensorBytes | None = None
        self._tensor_hashes: dict[str, BackgroundHash] = {}
        self._tensor_positions: dict[str, int] = {}
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

    def start_file_hash(self) -> None:
        """Hash the file as a side effect of reading its tensors in file order."""
        self._digest = BackgroundHash(self._header)
        self._position = self.data_start

    def file_hash(self) -> str | None:
        """The file's hash if every byte was read in order since start_file_hash, else None."""
        if self._digest is None or self._position != self.file_size:
            return None
        return str(self._digest.hexdigest())

    def start_tensor_hashes(self, tensor_bytes: TensorBytes) -> None:
        """Also hash every floating-point tensor as a side effect of reading its rows in order:
        the hash of ``tensor_bytes(spec, raw bytes)`` chunk by chunk (the weight hash's bf16
        rounding, see steer.models.bfloat16_bytes)."""
        self._tensor_bytes = tensor_bytes
        self._tensor_hashes = {}
        self._tensor_positions = {}

    def tensor_digests(self) -> dict[str, bytes]:
        """The hash of each floating-point tensor whose rows were all read in order since
        start_tensor_hashes."""
        return {
            name: digest.digest()
            for name, digest in self._tensor_hashes.items()
            if self._tensor_positions[name] == self.entries[name].end - self.entries[name].begin
        }

    def _read_at(self, offset: int, size: int, name: str) -> memoryview:
        with self._lock:  # shard threads may share a source file (see write_model)
            return self._read_locked(offset, size, name)

    def _read_locked(self, offset: int, size: int, name: str) -> memoryview:
        buffer = numpy.empty(size, numpy.uint8).data  # uninitialised: readinto fills it
        self._file.seek(offset)
        if self._file.readinto(buffer) != size:
            raise InvalidArgumentError(f"{self.path} is truncated at {name}", field="model")
        if self._digest is not None:
            if offset == self._position:
                self._digest.update(buffer)
                self._position += size
            elif offset > self._position:
                self._digest = None  # a gap: fall back to hashing the file separately
        if self._tensor_bytes is not None:
            self._hash_tensor(name, offset - self.data_start - self.entries[name].begin, buffer)
        return buffer

    def _hash_tensor(self, name: str, start: int, buffer: memoryview) -> None:
        spec = self.entries[name].spec
        if not spec.dtype.is_floating_point or self._tensor_bytes is None:
            return
        position = self._tensor_positions.setdefault(name, 0)
        if start != position:  # a re-read (ignored) or a gap (hashed separately later)
            if start > position:
                self._tensor_positions[name] = -1
            return
        digest = self._tensor_hashes.setdefault(name, BackgroundHash())
        if buffer:
            digest.update(self._tensor_bytes(spec, buffer))
        self._tensor_positions[name] = position + len(buffer)

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
    """Writes one safetensors file whose tensors are announced up front, then fed in order."""

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
        self.digest = BackgroundHash()
        self.size = 0
        self._file = opener(path)
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._write(_header_bytes(specs, metadata or {"format": "pt"}))

    def _write(self, data: bytes | memoryview, source: SourceBytes | None = None) -> None:
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
        self.digest.update(data)
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

    def write(self, name: str, pieces: Iterable[torch.Tensor | SourceBytes]) -> None:
        """Write tensor ``name`` from ``pieces`` whose bytes, concatenated, are the tensor in
        row-major order (e.g. row chunks of a large embedding)."""
        spec = self.specs[self._next]
        if name != spec.name:
            raise AssertionError(f"expected tensor {spec.name}, got {name}")
        self._next += 1
        written = 0
        for piece in pieces:
            if isinstance(piece, SourceBytes):
                if piece.data:
                    self._write(memoryview(piece.data), piece)
                written += len(piece.data)
                continue
            if piece.dtype != spec.dtype:
                raise AssertionError(f"{name}: piece dtype {piece.dtype} is not {spec.dtype}")
            if piece.numel():
                data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                self._write(data.data)
                written += data.nbytes
        if written != spec.nbytes:
            raise AssertionError(f"{name}: wrote {written} bytes, expected {spec.nbytes}")

    def close(self) -> str:
        """Flush and fsync; return the file's hash (:mod:`steer.digests`)."""
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
        return self.digest.hexdigest()

    def abort(self) -> None:
        self._file.close()
