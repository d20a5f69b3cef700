"""Spread many small tensor operations over the cores, one op stream per core.

Torch's own intra-op threads pay a barrier per operation; on slices of a few hundred
thousand elements, and on a machine that is busy anyway, that costs more than the
arithmetic. So for slice-sized work we turn them off and run one worker per core instead.

The workers live as long as the process, and each keeps its scratch buffers
(:func:`scratch`): a slice-sized buffer allocated afresh for every slice is a fresh
memory map (the CLI makes glibc map blocks of 1 MiB and more), and zero-filling its pages
cost more system time than the merge's arithmetic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")


def map_on_cores(
    function: Callable[[T], R], items: Iterable[T], *, parallel: bool = True, workers: int | None = None
) -> list[R]:
    """``[function(item) for item in items]``, on up to ``workers`` (default: torch's threads) cores.

    Torch runs single-threaded meanwhile, whether or not the work is spread (``parallel``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool_size = min(workers or threads, threads)
        if not parallel or pool_size <= 1:
            return [function(item) for item in items]
        return list(_workers(pool_size).map(function, items))
    finally:
        torch.set_num_threads(threads)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_local = threading.local()


def _workers(size: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(size)
        if pool is None:
            pool = _pools[size] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="mergebot-cores")
        return pool


def scratch(name: str, count: int, dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    """A buffer of ``count`` elements owned by the calling thread, reused from call to call.

    Its contents are whatever the last user left: callers overwrite it. Each ``name`` is a
    separate buffer, so one caller can hold several at once.
    """
    buffers: dict[tuple[str, Any], np.ndarray[Any, Any]] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (name, np.dtype(dtype))
    buffer = buffers.get(key)
    if buffer is None or buffer.size < count:
        buffer = buffers[key] = np.empty(count, dtype=dtype)
    return buffer[:count]
