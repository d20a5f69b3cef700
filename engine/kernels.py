"""Fused CPU loops for the hottest merges, compiled by numba when it is installed.

Why: a task-vector merge written as torch operations runs a dozen passes over every
element (convert, subtract, compare, mask, weigh, vote, agree, divide, add, round), each a
separate trip through memory with a thread barrier. Fused, each element is loaded once,
worked on in registers and stored once, in stored precision (bf16 bits are widened to
float32 in the loop). The arithmetic is the torch path's, operation for operation in float32,
so results equal it (tests compare both; the last bf16 digit may differ where torch uses a
fused multiply-add).

Every loop takes flat arrays and a ``[start, end)`` range, so the caller spreads slices over
the cores (``engine.parallel.map_on_cores``); the loops release the GIL. Inside, each loop
slices its arrays to the range and indexes from 0: numba wraps negative indices, and an index
like ``start + j`` it cannot prove non-negative kept the compiler from vectorizing (3x slower). Stored bf16 arrives as
``uint16`` bits, float32 as ``float32``; other dtypes take the torch path.

Without numba (or with ``MERGEBOT_KERNELS=torch``) :func:`available` is False and callers use
their torch code. Compiled loops are cached on disk by numba, so only a machine's first merge
pays the compile (about a second per loop).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.parallel import scratch

try:  # numba is an optional accelerator: everything works without it, more slowly
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic, overload

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is missing
    HAVE_NUMBA = False

KERNEL_DTYPES = (torch.bfloat16, torch.float32)
HIGH_BINS = 1 << 15  # |x| has no sign bit: 15 high bits of the float32 pattern
LOW_BINS = 1 << 16


def available() -> bool:
    """Whether the fused loops can be used (numba present and not turned off)."""
    return HAVE_NUMBA and os.environ.get("MERGEBOT_KERNELS", "numba").lower() != "torch"


def as_array(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A flat numpy view of a CPU tensor in a kernel dtype (bf16 as its uint16 bits), no copy."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.float32:
        return flat.numpy()
    raise TypeError(f"no kernel for {flat.dtype}")


def fits(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None) -> bool:
    """Whether a merge of these inputs into ``out_dtype`` can run in the kernels (one input dtype)."""
    return (
        (out_dtype or torch.float32) in KERNEL_DTYPES
        and len({t.dtype for t in tensors}) == 1
        and len({t.shape for t in tensors}) == 1
        and supports(*tensors)
    )


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernels (CPU, bf16 or float32, contiguous)."""
    return available() and all(
        t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous() for t in tensors
    )


if HAVE_NUMBA:

    @intrinsic
    def _float_from_bits(typingctx: Any, bits: Any) -> Any:
        # numba widens integer arithmetic to 64 bits: the low 32 are the float's pattern
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            value = args[0]
            if bits.bitwidth != 32:
                value = (
                    builder.trunc(value, ir.IntType(32))
                    if bits.bitwidth > 32
                    else builder.zext(value, ir.IntType(32))
                )
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _bits_from_float(typingctx: Any, value: Any) -> Any:
        if value != types.float32:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def _fma(typingctx: Any, x: Any, y: Any, z: Any) -> Any:
        # x * y + z rounded once, as torch's vectorized add(alpha=...) computes it
        if not (x == y == z == types.float32):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fma(*args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    # numba matches an overload's signature to its stub's, annotations included: none here

    def load(array, i):  # type: ignore[no-untyped-def]  # compiled code gets the overload below
        raise NotImplementedError

    def store(array, i, value):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @overload(load, inline="always")
    def _load(array, i):  # type: ignore[no-untyped-def]
        if array.dtype == types.uint16:
            return lambda array, i: _float_from_bits(np.uint32(array[i]) << np.uint32(16))
        if array.dtype == types.float32:
            return lambda array, i: array[i]
        return None

    @overload(store)
    def _store(array, i, value):  # type: ignore[no-untyped-def]
        if array.dtype == types.uint16:

            def to_bf16(array, i, value):  # type: ignore[no-untyped-def]
                # round to nearest even, as torch's float -> bfloat16 conversion; NaN stays NaN
                # (0x7FC0, chosen without a branch: the loops that store stay vectorizable)
                bits = _bits_from_float(value)
                bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                rounded = (bits + bias) >> np.uint32(16)
                nan = np.uint32((bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))
                array[i] = np.uint16(rounded ^ ((rounded ^ np.uint32(0x7FC0)) * nan))

            return to_bf16
        if array.dtype == types.float32:

            def to_f32(array, i, value):  # type: ignore[no-untyped-def]
                array[i] = value

            return to_f32
        return None

    @njit(nogil=True, cache=True)
    def _add_high_histogram(model: Any, base: Any, start: int, end: int, counts: Any) -> None:
        model, base = model[start:end], base[start:end]
        for i in range(end - start):
            bits = _bits_from_float(load(model, i) - load(base, i)) & np.uint32(0x7FFFFFFF)
            counts[bits >> np.uint32(16)] += 1

    @njit(nogil=True, cache=True)
    def _magnitude_high_histogram(model: Any, base: Any, start: int, end: int) -> Any:
        counts = np.zeros(HIGH_BINS, np.int64)
        _add_high_histogram(model, base, start, end, counts)
        return counts

    @njit(nogil=True, cache=True)
    def _sampled_high_histogram(model: Any, base: Any, n: int, blocks: int, block: int) -> Any:
        # ``blocks`` runs of ``block`` entries spread evenly over the tensor: contiguous runs
        # read whole cache lines, where a stride would pull in most of the tensor
        counts = np.zeros(HIGH_BINS, np.int64)
        step = n // blocks
        for j in range(blocks):
            _add_high_histogram(model, base, j * step, min(j * step + block, n), counts)
        return counts

    @njit(nogil=True, cache=True)
    def _magnitude_high_gather(
        model: Any, base: Any, start: int, end: int, low_bin: int, span: int, gathered: Any
    ) -> Any:
        # the high histogram, and (without a branch, as below) the patterns whose high bin is in
        # [low_bin, low_bin + span]: the unsigned difference wraps for bins under low_bin
        counts = np.zeros(HIGH_BINS, np.int64)
        model, base = model[start:end], base[start:end]
        found = 0
        for i in range(end - start):
            bits = _bits_from_float(load(model, i) - load(base, i)) & np.uint32(0x7FFFFFFF)
            high = bits >> np.uint32(16)
            counts[high] += 1
            gathered[found] = bits
            found += (high - np.uint32(low_bin)) <= np.uint32(span)
        return counts, found

    @njit(nogil=True, cache=True)
    def _gathered_low_histogram(gathered: Any, high: int, counts: Any) -> Any:
        counts[:] = 0
        for i in range(gathered.shape[0]):
            bits = gathered[i]
            counts[i & 3, bits & np.uint32(0xFFFF)] += (bits >> np.uint32(16)) == high
        return _sum_tables(counts)

    @njit(nogil=True, cache=True)
    def _sum_tables(counts: Any) -> Any:
        # the interleaved histograms added into one, in int64
        total = np.zeros(counts.shape[1], np.int64)
        for c in range(counts.shape[0]):
            for b in range(counts.shape[1]):
                total[b] += counts[c, b]
        return total

    @njit(nogil=True, cache=True)
    def _magnitude_low_histogram(
        model: Any, base: Any, start: int, end: int, high: int, gathered: Any, counts: Any
    ) -> Any:
        # Deltas of bf16 weights take few distinct low patterns, and the cut's bin can hold a
        # sixth of the entries: counted in place, each entry waited on the last one's increment
        # of the same counter and on a branch no predictor learns. So the bin's low halves are
        # first gathered without a branch, then counted in four interleaved histograms.
        model, base = model[start:end], base[start:end]
        found = 0
        for i in range(end - start):
            bits = _bits_from_float(load(model, i) - load(base, i)) & np.uint32(0x7FFFFFFF)
            gathered[found] = np.uint16(bits & np.uint32(0xFFFF))
            found += (bits >> np.uint32(16)) == high
        counts[:] = 0
        body = found - found % 4
        for i in range(0, body, 4):
            counts[0, gathered[i]] += 1
            counts[1, gathered[i + 1]] += 1
            counts[2, gathered[i + 2]] += 1
            counts[3, gathered[i + 3]] += 1
        for i in range(body, found):
            counts[0, gathered[i]] += 1
        return _sum_tables(counts)

    # The L1 sums below are float64 and reassociated, so the compiler vectorizes them (as in
    # _add_products: a fixed order per machine; only a float64 sum's last bits can move).

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _magnitude_sums(model: Any, base: Any, start: int, end: int, threshold: Any, sums: bool) -> Any:
        # (count == threshold, sum |d|, sum |d| over |d| > threshold)
        equal = 0
        total = 0.0
        above = 0.0
        model, base = model[start:end], base[start:end]
        for i in range(end - start):
            a = abs(load(model, i) - load(base, i))
            equal += a == threshold
            if sums:
                wide = np.float64(a)
                total += wide
                above += wide if a > threshold else 0.0
        return equal, total, above

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _random_sums(model: Any, base: Any, start: int, end: int, origin: Any, density: Any) -> Any:
        # (sum |d|, sum |d| over the entries a Bernoulli(density) draw keeps)
        total = 0.0
        kept = 0.0
        model, base = model[start:end], base[start:end]
        for i in range(end - start):
            a = np.float64(abs(load(model, i) - load(base, i)))
            total += a
            kept += a if _draw(origin, i) < density else 0.0
        return total, kept

    @njit(nogil=True, cache=True)
    def _nth_equal(model: Any, base: Any, start: int, end: int, threshold: Any, nth: int) -> int:
        # blocks of 256 counted without a branch (vectorized) until the one holding the nth tie
        model, base = model[start:end], base[start:end]
        length = end - start
        seen = 0
        first = 0
        while first < length:
            last = min(first + 256, length)
            count = 0
            for i in range(first, last):
                count += abs(load(model, i) - load(base, i)) == threshold
            if seen + count >= nth:
                for i in range(first, last):
                    if abs(load(model, i) - load(base, i)) == threshold:
                        seen += 1
                        if seen == nth:
                            return start + i
            seen += count
            first = last
        return -1

    # One model's slice of the task-vector merge: d = model - base, masked, rescaled, weighted,
    # stored as its row and added to the vote. One loop per kind of mask, each simple enough
    # for the compiler to vectorize (a shared loop with a switch inside ran six times slower).

    @njit(nogil=True, cache=True, inline="always")
    def _vote(d: Any, count: bool) -> Any:
        one = np.float32(1.0)
        if count:  # the count consensus adds signs
            return np.float32(0.0) if d == 0 else (one if d > 0 else -one)
        return d

    @njit(nogil=True, cache=True, inline="always")
    def _kept(d: Any, kept: bool, scale: Any, rescaled: bool, weight: Any) -> Any:
        # the torch path's order: times the mask (1 or 0), the L1 scale where one applies, the weight
        d = d * (np.float32(1.0) if kept else np.float32(0.0))
        if rescaled:
            d = d * scale
        return d * weight

    @njit(nogil=True, cache=True)
    def _row_all(model: Any, base: Any, start: int, weight: Any, row: Any, totals: Any, count: bool) -> None:
        model, base = model[start : start + row.shape[0]], base[start : start + row.shape[0]]
        for j in range(row.shape[0]):
            d = (load(model, j) - load(base, j)) * weight
            row[j] = d
            totals[j] += _vote(d, count)

    @njit(nogil=True, cache=True)
    def _row_magnitude(
        model: Any,
        base: Any,
        start: int,
        threshold: Any,
        last_tie: int,
        drop_threshold: Any,
        drop_last_tie: int,
        scale: Any,
        rescaled: bool,
        weight: Any,
        row: Any,
        totals: Any,
        count: bool,
    ) -> None:
        model, base = model[start : start + row.shape[0]], base[start : start + row.shape[0]]
        for j in range(row.shape[0]):
            i = start + j
            d = load(model, j) - load(base, j)
            a = abs(d)
            top = (a > threshold) | ((a == threshold) & (i <= last_tie))  # in the top cut ...
            dropped = (a > drop_threshold) | (
                (a == drop_threshold) & (i <= drop_last_tie)
            )  # ... not an outlier
            d = _kept(d, top & (dropped ^ True), scale, rescaled, weight)
            row[j] = d
            totals[j] += _vote(d, count)

    @njit(nogil=True, cache=True)
    def _row_random(
        model: Any,
        base: Any,
        start: int,
        origin: Any,
        density: Any,
        scale: Any,
        rescaled: bool,
        weight: Any,
        row: Any,
        totals: Any,
        count: bool,
    ) -> None:
        model, base = model[start : start + row.shape[0]], base[start : start + row.shape[0]]
        for j in range(row.shape[0]):
            d = load(model, j) - load(base, j)
            d = _kept(d, _draw(origin, j) < density, scale, rescaled, weight)
            row[j] = d
            totals[j] += _vote(d, count)

    # DELLA's MagPrune: per row, the entries' magnitude ranks (a stable LSD radix sort of the
    # float32 patterns of |d|, which order like the values; ties stay in position order, as
    # torch's stable argsort leaves them), then a keep draw against the rank's probability.

    @njit(nogil=True, cache=True)
    def _della_mask(
        model: Any, base: Any, start: int, end: int, m: int, origin: Any, table: Any, row: Any, keep: Any
    ) -> None:
        length = end - start
        model, base = model[start:end], base[start:end]
        for j in range(length):
            row[j] = load(model, j) - load(base, j)
        keys = np.empty(m, np.uint32)
        spare_keys = np.empty(m, np.uint32)
        order = np.empty(m, np.int32)
        spare_order = np.empty(m, np.int32)
        counts = np.empty((4, 256), np.int64)
        digit = np.uint32(255)
        nan_key = np.uint32(0x7F800001)  # every NaN ranks above inf, NaNs by position
        for first in range(0, length, m):
            counts[:] = 0
            for j in range(m):
                bits = _bits_from_float(row[first + j]) & np.uint32(0x7FFFFFFF)
                key = np.uint32(min(bits, nan_key))
                keys[j] = key
                order[j] = j
                counts[0, key & digit] += 1
                counts[1, (key >> np.uint32(8)) & digit] += 1
                counts[2, (key >> np.uint32(16)) & digit] += 1
                counts[3, key >> np.uint32(24)] += 1
            src_keys, dst_keys, src_order, dst_order = keys, spare_keys, order, spare_order
            for p in range(4):
                shift = np.uint32(8 * p)
                c = counts[p]
                if c[(src_keys[0] >> shift) & digit] == m:  # one digit for the whole row: no reorder
                    continue
                total = 0
                for b in range(256):
                    size = c[b]
                    c[b] = total
                    total += size
                for j in range(m):
                    key = src_keys[j]
                    b = (key >> shift) & digit
                    at = c[b]
                    c[b] = at + 1
                    dst_keys[at] = key
                    dst_order[at] = src_order[j]
                src_keys, dst_keys = dst_keys, src_keys
                src_order, dst_order = dst_order, src_order
            for rank in range(m):
                j = first + src_order[rank]
                keep[j] = _draw(origin, j) < table[rank]

    @njit(nogil=True, cache=True)
    def _delta(model: Any, base: Any, start: int, row: Any) -> None:
        model, base = model[start : start + row.shape[0]], base[start : start + row.shape[0]]
        for j in range(row.shape[0]):
            row[j] = load(model, j) - load(base, j)

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _della_sums(row: Any, keep: Any) -> Any:
        # (sum |d|, sum |d| over the kept entries)
        total = 0.0
        kept = 0.0
        for j in range(row.shape[0]):
            a = np.float64(abs(row[j]))
            total += a
            kept += a if keep[j] else 0.0
        return total, kept

    @njit(nogil=True, cache=True)
    def _row_della(
        row: Any, keep: Any, scale: Any, rescaled: bool, weight: Any, totals: Any, count: bool
    ) -> None:
        for j in range(row.shape[0]):
            d = _kept(row[j], keep[j], scale, rescaled, weight)
            row[j] = d
            totals[j] += _vote(d, count)

    @njit(nogil=True, cache=True)
    def _combine_rows(
        base: Any,
        start: int,
        end: int,
        rows: Any,
        weights: Any,
        totals: Any,
        consensus: int,
        weight_sum: Any,
        normalize: bool,
        lam: Any,
        out: Any,
        merged: Any,
        divisor: Any,
    ) -> None:
        # the vote, the agreeing rows' sum and its divisor, lambda, plus the base; then the store.
        # Row by row over the slice (not element by element over the rows): loops the
        # compiler can vectorize; the additions happen in the same order either way.
        length = end - start
        one = np.float32(1.0)
        zero = np.float32(0.0)
        base, out = base[start:end], out[start:end]
        if consensus != 0:
            merged[:] = zero
            divisor[:] = zero
            for r in range(rows.shape[0]):
                w = weights[r]
                row = rows[r]
                for j in range(length):
                    value = row[j]
                    agree = value > zero if totals[j] >= zero else value < zero
                    merged[j] += value if agree else zero
                    divisor[j] += w if agree else zero
            for j in range(length):
                d = divisor[j]
                if d == zero:
                    d = one
                m = merged[j]
                if normalize:
                    m = m / d
                if lam != one:
                    m = m * lam
                store(out, j, m + load(base, j))
        else:
            for j in range(length):
                m = totals[j]
                if normalize:
                    m = m / weight_sum
                if lam != one:
                    m = m * lam
                store(out, j, m + load(base, j))

    @njit(nogil=True, cache=True, inline="always")
    def _draw(origin: Any, j: int) -> Any:
        # SplitMix64's finalizer of (key + gamma + position), ``origin`` being key + gamma + the
        # slice's start: the same integers as the torch code; computed where it is used, a draw
        # costs no memory traffic
        z = origin + np.uint64(j)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return np.float32(z >> np.uint64(40)) * np.float32(2.0**-24)

    @njit(nogil=True, cache=True)
    def _fill_draws(origin: Any, out: Any) -> None:
        for j in range(out.shape[0]):
            out[j] = _draw(origin, j)

    @njit(nogil=True, cache=True)
    def _block_gram(models: Any, base: Any, start: int, end: int, rows: Any, subtract: bool) -> Any:
        # A block of rows (inputs, or inputs minus the base) at a time, small enough to stay in
        # the L1/L2 cache while every pair's sums read it again.
        count = len(models)
        gram = np.zeros((count, count), np.float64)
        block = rows.shape[1]
        for first in range(start, end, block):
            last = min(first + block, end)
            b = base[first:last]
            for m in range(count):
                x = models[m][first:last]
                row = rows[m]
                if subtract:
                    for i in range(last - first):
                        row[i] = load(x, i) - load(b, i)
                else:
                    for i in range(last - first):
                        row[i] = load(x, i)
            _add_products(rows, last - first, gram)
        for a in range(count):
            for c in range(a):
                gram[a, c] = gram[c, a]
        return gram

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _add_products(rows: Any, length: int, gram: Any) -> None:
        # Products of float32 values are exact in float64. Reassociation lets the compiler
        # vectorize the sums (4x faster than four hand-interleaved chains, which it would not);
        # the order is then fixed by the compiled loop: the same on every run of a machine, and
        # another CPU's vector width moves only the last bits of a float64 sum.
        count = rows.shape[0]
        for a in range(count):
            ra = rows[a]
            for b in range(a, count):
                rb = rows[b]
                total = 0.0
                for j in range(length):
                    total += np.float64(ra[j]) * np.float64(rb[j])
                gram[a, b] += total

    @njit(nogil=True, cache=True)
    def _scaled_delta_sum(
        models: Any, base: Any, start: int, end: int, scale: Any, out: Any, acc: Any
    ) -> None:
        # the torch path's order: d_0 + d_1 + ..., times scale, plus the base
        n = end - start
        base, out = base[start:end], out[start:end]
        x = models[0][start:end]
        for i in range(n):
            acc[i] = load(x, i) - load(base, i)
        for m in range(1, len(models)):
            x = models[m][start:end]
            for i in range(n):
                acc[i] = acc[i] + (load(x, i) - load(base, i))
        for i in range(n):
            store(out, i, acc[i] * scale + load(base, i))

    @njit(nogil=True, cache=True)
    def _weighted_sum(inputs: Any, start: int, end: int, weights: Any, out: Any, acc: Any) -> None:
        # linear: x_0 * w_0, then + x_i * w_i in model order, fused multiply-adds in float32 (as torch)
        n = end - start
        w0 = weights[0]
        x = inputs[0][start:end]
        for i in range(n):
            acc[i] = load(x, i) * w0
        for m in range(1, len(inputs)):
            w = weights[m]
            x = inputs[m][start:end]
            for i in range(n):
                acc[i] = _fma(load(x, i), w, acc[i])
        out = out[start:end]
        for i in range(n):
            store(out, i, acc[i])

    @njit(nogil=True, cache=True)
    def _delta_gram_signs(models: Any, base: Any, start: int, end: int, rows: Any, flags: Any) -> Any:
        # _block_gram's task vectors, and per entry whether some are positive (bit 0) and
        # some negative (bit 1), from the same block of rows while it is in the cache
        count = len(models)
        gram = np.zeros((count, count), np.float64)
        block = rows.shape[1]
        conflicts = 0
        nonzero = 0
        for first in range(start, end, block):
            last = min(first + block, end)
            n = last - first
            b = base[first:last]
            for i in range(n):
                flags[i] = 0
            for m in range(count):
                x = models[m][first:last]
                row = rows[m]
                for i in range(n):
                    d = load(x, i) - load(b, i)
                    row[i] = d
                    flags[i] |= np.uint8(d > 0) | (np.uint8(d < 0) << np.uint8(1))
            _add_products(rows, n, gram)
            for i in range(n):
                conflicts += flags[i] == 3
                nonzero += flags[i] != 0
        for a in range(count):
            for c in range(a):
                gram[a, c] = gram[c, a]
        return gram, conflicts, nonzero


GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def draw_origin(key: int, start: int) -> np.uint64:
    """Where a slice's draws start in the hash's input: key + SplitMix64's gamma + ``start``."""
    return np.uint64((key + GOLDEN_GAMMA + start) & 0xFFFFFFFFFFFFFFFF)


def fill_draws(key: int, start: int, out: np.ndarray[Any, Any]) -> None:
    """``out[j]`` = the uniform draw of position ``start + j`` (see ``sparsify.uniform_draws``)."""
    _fill_draws(draw_origin(key, start), out)


GRAM_BLOCK = 4096


def delta_gram(
    models: tuple[np.ndarray[Any, Any], ...], base: np.ndarray[Any, Any], start: int, end: int
) -> np.ndarray[Any, Any]:
    """The Gram matrix of the task vectors ``model_i - base`` over ``[start, end)``, in float64."""
    rows = scratch("gram", len(models) * GRAM_BLOCK).reshape(len(models), GRAM_BLOCK)
    return _block_gram(models, base, start, end, rows, True)


def gram(models: tuple[np.ndarray[Any, Any], ...], start: int, end: int) -> np.ndarray[Any, Any]:
    """The Gram matrix of the inputs themselves over ``[start, end)``, in float64."""
    rows = scratch("gram", len(models) * GRAM_BLOCK).reshape(len(models), GRAM_BLOCK)
    return _block_gram(models, models[0], start, end, rows, False)


def delta_gram_signs(
    models: tuple[np.ndarray[Any, Any], ...], base: np.ndarray[Any, Any], start: int, end: int
) -> tuple[np.ndarray[Any, Any], int, int]:
    """:func:`delta_gram`, and the entries where the task vectors take both signs, and where any is non-zero."""
    rows = scratch("gram", len(models) * GRAM_BLOCK).reshape(len(models), GRAM_BLOCK)
    gram, conflicts, nonzero = _delta_gram_signs(
        models, base, start, end, rows, scratch("signs", GRAM_BLOCK, np.uint8)
    )
    return gram, int(conflicts), int(nonzero)


def scaled_delta_sum(
    models: tuple[np.ndarray[Any, Any], ...],
    base: np.ndarray[Any, Any],
    start: int,
    end: int,
    scale: float,
    out: np.ndarray[Any, Any],
) -> None:
    """``out = (sum_i (model_i - base)) * scale + base`` over ``[start, end)`` (Model Stock's merge)."""
    _scaled_delta_sum(models, base, start, end, np.float32(scale), out, scratch("sum", end - start))


def magnitude_histograms(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, end: int
) -> Any:
    return _magnitude_high_histogram(model, base, start, end)


def sampled_high_histogram(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], n: int, blocks: int, block: int
) -> Any:
    """The high histogram of ``|model - base|`` over ``blocks`` evenly spaced runs of ``block`` entries."""
    return _sampled_high_histogram(model, base, n, blocks, block)


def magnitude_high_gather(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, end: int, low_bin: int, high_bin: int
) -> tuple[Any, np.ndarray[Any, Any]]:
    """A slice's high histogram, and the bit patterns (a fresh array) of its entries in bins [low_bin, high_bin]."""
    gathered = scratch("gathered bits", end - start, np.uint32)
    counts, found = _magnitude_high_gather(model, base, start, end, low_bin, high_bin - low_bin, gathered)
    return counts, gathered[:found].copy()


def magnitude_high_low_histograms(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, end: int, high_bin: int
) -> tuple[Any, Any]:
    """A slice's high histogram, and the low histogram of its entries in bin ``high_bin``, in one read."""
    gathered = scratch("gathered bits", end - start, np.uint32)
    counts, found = _magnitude_high_gather(model, base, start, end, high_bin, 0, gathered)
    return counts, gathered_low_histogram(gathered[:found], high_bin)


def gathered_low_histogram(gathered: np.ndarray[Any, Any], high: int) -> Any:
    """The low histogram of the gathered patterns whose high bin is ``high``."""
    counts = scratch("low counts", 4 * LOW_BINS, np.int32).reshape(4, LOW_BINS)
    return _gathered_low_histogram(gathered, high, counts)


def magnitude_low_histogram(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, end: int, high: int
) -> Any:
    gathered = scratch("gathered", end - start, np.uint16)
    counts = scratch("low counts", 4 * LOW_BINS, np.int32).reshape(4, LOW_BINS)
    return _magnitude_low_histogram(model, base, start, end, high, gathered, counts)


def magnitude_sums(
    model: np.ndarray[Any, Any],
    base: np.ndarray[Any, Any],
    start: int,
    end: int,
    threshold: float,
    sums: bool,
) -> tuple[int, float, float]:
    equal, total, above = _magnitude_sums(model, base, start, end, np.float32(threshold), sums)
    return int(equal), float(total), float(above)


def random_sums(
    model: np.ndarray[Any, Any],
    base: np.ndarray[Any, Any],
    start: int,
    end: int,
    key: int,
    density: float,
) -> tuple[float, float]:
    """The L1 norms of a slice of ``model - base`` and of what a Bernoulli(density) draw keeps.

    ``key`` is the draws' key (``sparsify.draw_key``); the draws are computed in the loop.
    """
    total, kept = _random_sums(model, base, start, end, draw_origin(key, start), np.float32(density))
    return float(total), float(kept)


def nth_equal(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, end: int, threshold: float, nth: int
) -> int:
    return int(_nth_equal(model, base, start, end, np.float32(threshold), nth))


def kept_delta_row(
    model: np.ndarray[Any, Any],
    base: np.ndarray[Any, Any],
    start: int,
    *,
    kind: str,
    threshold: float = 0.0,
    last_tie: int = -1,
    drop_threshold: float = float("inf"),
    drop_last_tie: int = -1,
    key: int | None = None,
    density: float = 1.0,
    scale: float = 1.0,
    weight: float,
    row: np.ndarray[Any, Any],
    totals: np.ndarray[Any, Any],
    count: bool = False,
) -> None:
    """Write one model's weighted, masked task vector for ``[start, start + len(row))`` into ``row``.

    ``totals`` (zeroed by the caller before the first model) gets each entry's vote added:
    the value, or its sign with ``count``. ``kind`` is ``all``, ``magnitude`` or ``random``.
    """
    f32 = np.float32
    # the torch path multiplies by the scale only where a mask applies and it is not 1.0
    rescaled = kind != "all" and f32(scale) != f32(1.0)
    if kind == "all":
        _row_all(model, base, start, f32(weight), row, totals, count)
    elif kind == "magnitude":
        _row_magnitude(
            model,
            base,
            start,
            f32(threshold),
            last_tie,
            f32(drop_threshold),
            drop_last_tie,
            f32(scale),
            rescaled,
            f32(weight),
            row,
            totals,
            count,
        )
    elif kind == "random" and key is not None:
        origin = draw_origin(key, start)
        _row_random(
            model, base, start, origin, f32(density), f32(scale), rescaled, f32(weight), row, totals, count
        )
    else:
        raise ValueError(f"unknown mask kind {kind!r} (or random without a key)")


def della_mask(
    model: np.ndarray[Any, Any],
    base: np.ndarray[Any, Any],
    start: int,
    end: int,
    *,
    row_length: int,
    key: int,
    table: np.ndarray[Any, Any],
    row: np.ndarray[Any, Any],
    keep: np.ndarray[Any, Any],
) -> None:
    """DELLA's MagPrune over whole rows ``[start, end)``: ``row`` gets ``model - base``, ``keep`` the mask.

    ``key`` is the draws' key (``sparsify.draw_key``), ``table`` (float32) the keep probability
    of each rank; a rank is the entry's place in its row by magnitude, ties by position.
    """
    _della_mask(model, base, start, end, row_length, draw_origin(key, start), table, row, keep)


def delta(
    model: np.ndarray[Any, Any], base: np.ndarray[Any, Any], start: int, row: np.ndarray[Any, Any]
) -> None:
    """``row`` = ``model - base`` over ``[start, start + len(row))``, in float32."""
    _delta(model, base, start, row)


def della_sums(row: np.ndarray[Any, Any], keep: np.ndarray[Any, Any]) -> tuple[float, float]:
    """The L1 norms of a slice of a task vector and of what its mask keeps (float64 sums)."""
    total, kept = _della_sums(row, keep)
    return float(total), float(kept)


def della_row(
    row: np.ndarray[Any, Any],
    keep: np.ndarray[Any, Any],
    *,
    scale: float,
    weight: float,
    totals: np.ndarray[Any, Any],
    count: bool = False,
) -> None:
    """Mask, rescale and weigh a task vector's slice in ``row`` in place; add its vote to ``totals``."""
    f32 = np.float32
    _row_della(row, keep, f32(scale), f32(scale) != f32(1.0), f32(weight), totals, count)


def combine_rows(
    base: np.ndarray[Any, Any],
    start: int,
    end: int,
    *,
    rows: np.ndarray[Any, Any],
    weights: np.ndarray[Any, Any],
    totals: np.ndarray[Any, Any],
    consensus: int,
    weight_sum: float,
    normalize: bool,
    lam: float,
    out: np.ndarray[Any, Any],
) -> None:
    _combine_rows(
        base,
        start,
        end,
        rows,
        weights,
        totals,
        consensus,
        np.float32(weight_sum),
        normalize,
        np.float32(lam),
        out,
        scratch("merged", end - start),
        scratch("divisor", end - start),
    )


def weighted_sum(
    inputs: tuple[np.ndarray[Any, Any], ...],
    start: int,
    end: int,
    weights: np.ndarray[Any, Any],
    out: np.ndarray[Any, Any],
) -> None:
    _weighted_sum(inputs, start, end, weights, out, scratch("sum", end - start))
