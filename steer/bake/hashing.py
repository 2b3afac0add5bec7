"""Background hashing for the bake: BLAKE3 updates on shared worker threads, in order.

Hashing overlaps reading, editing and writing: each file's and each tensor's digest
(:mod:`steer.digests`) is fed by the bytes the bake reads or writes anyway, from threads of
:data:`HASH_WORKERS` (BLAKE3 releases the GIL on large buffers).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from steer import digests


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


class OrderedHash:
    """The hash of one byte range fed by reads that may repeat or skip: a read that starts where
    the hashed bytes end extends them, an earlier one (a re-read) is ignored, a later one (a gap)
    spoils the hash, which the owner then computes another way."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.hash = BackgroundHash()

    def feed(self, start: int, length: int, data: bytes | memoryview | Callable[[], Any]) -> None:
        """Bytes ``start:start + length`` of the range; ``data`` is what to hash for them (or a
        callable making it, called only when they extend the hash)."""
        if start != self.position:
            if start > self.position:
                self.position = -1
            return
        self.hash.update(data() if callable(data) else data)
        self.position += length

    def digest(self) -> bytes | None:
        """The digest if every byte of the range was fed in order, else None."""
        return self.hash.digest() if self.position == self.size else None
