"""Spread many small tensor operations over the cores, one op stream per core.

Torch's own intra-op threads pay a barrier per operation; on slices of a few hundred
thousand elements, and on a machine that is busy anyway, that costs more than the
arithmetic. So for slice-sized work we turn them off and run one worker per core instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
        with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="mergebot-cores") as pool:
            return list(pool.map(function, items))
    finally:
        torch.set_num_threads(threads)
