"""Recycled output buffers: reused only once freed, bounded, exact-size."""

from __future__ import annotations

import gc

import torch

from engine.buffers import POOLED_BYTES, BufferPool, empty


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_freed_tensor_gives_its_memory_to_the_next_one_of_its_size() -> None:
    pool = BufferPool()
    first = empty((1024, 1024), torch.bfloat16, pool)
    where = _address(first)
    del first
    gc.collect()
    assert pool.held_bytes == 2 * 1024 * 1024
    again = empty((2048, 512), torch.bfloat16, pool)  # same bytes, other shape
    assert _address(again) == where
    assert again.shape == (2048, 512) and again.dtype == torch.bfloat16
    assert pool.held_bytes == 0


def test_a_live_tensor_is_never_handed_out_again() -> None:
    pool = BufferPool()
    kept = empty((1 << 20,), torch.float32, pool)
    kept.fill_(3.0)
    view = kept[10:20]  # a view keeps the memory alive too
    del kept
    other = empty((1 << 20,), torch.float32, pool)
    other.fill_(-1.0)
    assert torch.equal(view, torch.full((10,), 3.0))
    assert pool.held_bytes == 0


def test_views_through_numpy_and_dtype_changes_keep_the_memory() -> None:
    pool = BufferPool()
    tensor = empty((512, 1024), torch.bfloat16, pool)
    bits = tensor.view(torch.int16).numpy()  # what the fused kernels write through
    del tensor
    gc.collect()
    assert pool.held_bytes == 0
    del bits
    gc.collect()
    assert pool.held_bytes == 512 * 1024 * 2


def test_the_pool_keeps_a_few_buffers_per_size_and_bounded_bytes() -> None:
    pool = BufferPool(keep_per_size=2, keep_bytes=3 * POOLED_BYTES)
    tensors = [empty((POOLED_BYTES // 4,), torch.float32, pool) for _ in range(4)]
    del tensors
    gc.collect()
    assert pool.held_bytes == 2 * POOLED_BYTES
    bigger = [empty((POOLED_BYTES // 2,), torch.float32, pool) for _ in range(2)]  # 2 MiB each
    assert pool.held_bytes == 0  # a size it did not hold: the kept buffers were let go first
    del bigger
    gc.collect()
    assert pool.held_bytes == 2 * POOLED_BYTES  # one 2 MiB buffer; a second would pass the bound
    pool.clear()
    assert pool.held_bytes == 0


def test_small_and_other_dtypes_come_from_torch() -> None:
    pool = BufferPool()
    small = empty((16, 16), torch.float32, pool)
    odd = empty((1 << 20,), torch.int64, pool)
    del small, odd
    gc.collect()
    assert pool.held_bytes == 0
