"""Output buffers recycled from tensor to tensor.

Why: a merge writes every output tensor once, into fresh memory. Fresh memory from the
system is zero-filled page by page on first touch, and for a 1 GB model that zeroing cost
more system time than the merge's arithmetic. Transformer layers repeat the same shapes, so
a buffer freed by one layer's tensor (once the writer has stored it) fits the next layer's:
reused, it is already mapped and nothing is zeroed.

A tensor from :func:`empty` gives its memory back by itself when the last reference to it
goes (a finalizer on the numpy array under it), so callers need no release call and a
tensor that is kept (an evolve trial's weights) is simply never reused. The pool keeps a
few buffers per size and a bounded number of bytes, and lets go of all of them when a
size it does not hold is asked for (a new shape: the first layer, or the output head at
the end), so the buffers it keeps never add to a merge's peak memory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

POOLED_BYTES = 1 << 20  # smaller blocks come from malloc's heap, already mapped
KEEP_PER_SIZE = 3  # one being computed, two waiting for the writer
KEEP_BYTES = 512 << 20

_NUMPY = {torch.bfloat16: np.int16, torch.float32: np.float32, torch.float16: np.float16}


class BufferPool:
    """Byte buffers by exact size, handed out and taken back from any thread."""

    def __init__(self, keep_per_size: int = KEEP_PER_SIZE, keep_bytes: int = KEEP_BYTES) -> None:
        self._keep_per_size = keep_per_size
        self._keep_bytes = keep_bytes
        self._free: dict[int, list[np.ndarray[Any, Any]]] = {}
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray[Any, Any]:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._held -= nbytes
                return free.pop()
            self._free.clear()  # a new size: the kept ones go back to the system before it is mapped
            self._held = 0
        return np.empty(nbytes, np.uint8)

    def give_back(self, buffer: np.ndarray[Any, Any]) -> None:
        nbytes = buffer.nbytes
        with self._lock:
            free = self._free.setdefault(nbytes, [])
            if len(free) < self._keep_per_size and self._held + nbytes <= self._keep_bytes:
                free.append(buffer)
                self._held += nbytes

    @property
    def held_bytes(self) -> int:
        return self._held

    def clear(self) -> None:
        """Drop every kept buffer (their memory goes back to the system)."""
        with self._lock:
            self._free.clear()
            self._held = 0


POOL = BufferPool()


def empty(shape: Sequence[int] | torch.Size, dtype: torch.dtype, pool: BufferPool = POOL) -> torch.Tensor:
    """An uninitialized CPU tensor, its memory from ``pool`` (and back there once it is freed)."""
    dims = tuple(int(d) for d in shape)
    count = 1
    for d in dims:
        count *= d
    element = _NUMPY.get(dtype)
    nbytes = count * (np.dtype(element).itemsize if element is not None else 0)
    if element is None or nbytes < POOLED_BYTES:
        return torch.empty(dims, dtype=dtype)
    buffer = pool.take(nbytes)
    typed = buffer.view(element)
    weakref.finalize(typed, pool.give_back, buffer)
    return torch.from_numpy(typed).view(dtype).reshape(dims)
