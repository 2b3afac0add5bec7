"""Thread tuning for the bake: torch's element-wise kernels on the calling shard thread only."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch


def _omp_set_num_threads() -> Callable[[int], None] | None:
    try:
        return ctypes.CDLL(None).omp_set_num_threads  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # torch built without OpenMP, or not loaded globally
        return None


_OMP_SET_NUM_THREADS = _omp_set_num_threads()


def serial_torch_in_this_thread() -> None:
    """Run torch's element-wise kernels on the calling thread only, leaving other threads as
    they are.

    The bake already runs one shard per core; if each shard thread's float32 edits also started
    torch's intra-op threads, twice as many threads as cores would contend (measured on 2
    cores: about 0.15 CPU s of a 1.6 s bake, scripts/bench_bake.py). ``torch.set_num_threads``
    would also change the default every thread started later inherits (a server's too), so this
    sets OpenMP's per-thread team size instead, after torch has initialised this thread's
    setting, which torch reads back on each parallel loop.
    """
    torch.get_num_threads()  # torch's once-per-thread setup, from the process-wide setting
    if _OMP_SET_NUM_THREADS is not None:
        _OMP_SET_NUM_THREADS(1)
