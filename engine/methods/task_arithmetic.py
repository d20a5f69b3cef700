"""The task-vector family as one generalized merge: task arithmetic, TIES, DARE, Breadcrumbs, DELLA.

For each model, its task vector is ``delta_i = model_i - base``. Optionally each delta is
sparsified (TIES: by magnitude; DARE: at random; Breadcrumbs: by magnitude without the
largest outliers, ``gamma``; DELLA: at random with probabilities by magnitude rank,
``density ± epsilon``; see :mod:`engine.methods.sparsify`), then weighted. With a
consensus step (TIES, DARE-TIES, Breadcrumbs-TIES, DELLA) a sign is elected per element
from the sum of the *weighted* deltas, and only deltas that agree with it are kept. The
merged delta is their sum, divided, when ``normalize`` is on, by the sum of the weights
that took part (per element under consensus), scaled by ``lambda`` and added to the base.

Compatibility notes (mergekit behaviour that recipes rely on, matched on purpose):
- ``ties`` normalizes by default and ``dare_ties`` does not, so DARE-TIES weights are
  absolute scales while TIES weights are relative.
- the sign vote uses the weighted deltas, so a negative weight votes against its model.
- elements where a delta is exactly zero take no part in the divisor.
- mergekit 0.1.5 does not expose its consensus rule (``sum`` or ``count``) as a recipe
  parameter: every method with a consensus step uses ``sum``, and so do we.
Difference: deltas are computed in float32 (mergekit uses the input dtype, often bf16),
which is closer to the exact result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from engine import buffers, kernels
from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.sparsify import (
    DRAW_BLOCK,
    check_della,
    della_magprune,
    della_row_mask,
    della_table,
    draw_key,
    l1_scale,
    topk_cut,
    uniform_draws,
)
from engine.parallel import map_on_cores, scratch

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
Consensus = Literal["sum", "count"] | None


def _merge_rows(
    rows: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor,
    totals: torch.Tensor,
    consensus: Consensus,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Combine weighted task vectors into the result: vote, keep the agreeing, normalize, add to the base.

    ``totals`` is the rows' sum (for the ``count`` vote: the sum of their signs), computed by
    the caller in whatever order it holds the rows. Rows may be overwritten.
    """
    if consensus is not None:
        elected = torch.where(totals >= 0, 1.0, -1.0).to(base.dtype)  # +1 or -1 per element
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for row, weight in zip(rows, weights, strict=True):  # one model at a time: small working set
            agree = (row * elected) > 0  # same sign as elected; a zero delta never takes part
            merged.add_(row.mul_(agree))
            divisor.add_(agree, alpha=weight)
        divisor[divisor == 0] = 1.0
    else:
        merged = totals
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=base.dtype)
    if normalize:
        merged /= divisor
    if lam != 1.0:
        merged *= lam
    return merged.add_(base)


SLICE = DRAW_BLOCK  # elements per slice of the second pass: cache-resident, one block of random draws


@dataclass(frozen=True)
class _Cut:
    """The top k of a task vector by magnitude: above ``threshold``, or on it up to ``last_tie``.

    ``EVERYTHING`` and ``NOTHING`` stand for k = n and k = 0.
    """

    threshold: float
    last_tie: int = -1

    def mask(self, magnitudes: torch.Tensor, start: int) -> torch.Tensor:
        keep = magnitudes > self.threshold
        if self.last_tie >= start:
            positions = torch.arange(start, start + magnitudes.numel(), device=magnitudes.device)
            keep |= (magnitudes == self.threshold) & (positions <= self.last_tie)
        return keep


EVERYTHING = _Cut(-math.inf)
NOTHING = _Cut(math.inf)


@dataclass(frozen=True)
class _Keep:
    """Which entries of one task vector survive, and by how much the survivors are scaled.

    ``magnitude``: the entries in the ``top`` cut but not in the ``drop`` cut (TIES: the top
    k, nothing dropped; Breadcrumbs: a band below the largest outliers).
    ``random``: a Bernoulli(density) draw per entry, from a generator seeded per slice, so
    any slice's mask can be drawn again, in any order, on any thread.
    ``della``: DELLA's MagPrune over rows of ``row`` entries (slices hold whole rows): a
    draw per entry against a probability set by its magnitude rank in its row.
    """

    kind: Literal["all", "magnitude", "random", "della"]
    scale: float = 1.0  # L1 rescale factor (1.0 when off)
    top: _Cut = EVERYTHING
    drop: _Cut = NOTHING
    density: float = 1.0
    seed: int = 0
    epsilon: float = 0.0
    row: int = 1

    def mask(self, d: torch.Tensor, start: int) -> torch.Tensor | None:
        """The keep mask of the slice of this task vector that begins at ``start`` (None: keep all)."""
        if self.kind == "magnitude":
            a = d.abs()
            keep = self.top.mask(a, start)
            if self.drop != NOTHING:
                keep &= ~self.drop.mask(a, start)
            return keep
        if self.kind == "random":
            return (uniform_draws(self.seed, start, d.numel()) < self.density).to(d.device)
        if self.kind == "della":
            rows = d.reshape(-1, self.row)
            return della_row_mask(rows, self.density, self.epsilon, self.seed, start).reshape(-1)
        return None


def _magnitude_ranks(n: int, density: float, gamma: float | None) -> tuple[int, int] | None:
    """How many of the largest entries to keep (``top``), and of those the largest to drop.

    TIES keeps ``max(1, int(density * n))`` and drops none; Breadcrumbs (``gamma``) keeps as
    many, ranked just below the ``int(gamma * n)`` largest (fewer outliers are dropped when
    both do not fit: mergekit's rule). None: everything is kept.
    """
    if density >= 1 or n == 0:
        return None
    keep = max(1, int(density * n))
    if gamma is None:
        return keep, 0
    outliers = max(0, int(gamma * n))
    bottom = max(0, n - keep - outliers)  # entries dropped as too small
    return n - bottom, n - bottom - keep


def _torch_cut(magnitudes: torch.Tensor, k: int) -> tuple[_Cut, float]:
    """The top-k cut of flat magnitudes and the L1 norm of what it keeps (float64 sums)."""
    n = magnitudes.numel()
    if k >= n:
        return EVERYTHING, float(torch.linalg.vector_norm(magnitudes, 1, dtype=torch.float64))
    if k <= 0:
        return NOTHING, 0.0
    threshold, last_tie = topk_cut(magnitudes, k)
    above = magnitudes > threshold
    kept = (
        float(magnitudes[above].sum(dtype=torch.float64)) + (k - int(torch.count_nonzero(above))) * threshold
    )
    return _Cut(threshold, last_tie), kept


def _plan_trim(delta: torch.Tensor, ranks: tuple[int, int] | None, rescale: bool) -> _Keep:
    """First pass over one full task vector: the exact cuts (see ``sparsify.topk_cut``).

    Takes ownership of ``delta``: it is turned into magnitudes in place, so the pass holds
    one full-size tensor (plus boolean masks), not several.
    """
    if ranks is None:
        return _Keep("all")
    magnitudes = delta.abs_().reshape(-1)
    top, top_sum = _torch_cut(magnitudes, ranks[0])
    drop, drop_sum = _torch_cut(magnitudes, ranks[1])
    scale = 1.0
    if rescale:  # L1 norms: the magnitudes' sums, before and after the cut
        before = float(torch.linalg.vector_norm(magnitudes, 1, dtype=torch.float64))
        scale = l1_scale(before, top_sum - drop_sum)
    return _Keep("magnitude", scale, top, drop)


def sparse_merge_by_slices(call: MergeCall, sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    """TIES, DARE and DELLA in two passes: what each task vector keeps first, then the rest by slices.

    The first pass settles, per model, the exact top-k cut (TIES) or the L1 norms under the
    random mask (DARE; DELLA, whose slices hold whole rows, as its magnitude ranks are per
    row, and whose masks are drawn again in the second pass rather than kept: memory stays
    a few slices); after it every step is elementwise, so the vote and the merge run
    over cache-sized slices spread on the cores instead of a dozen full-size temporaries
    streaming through memory. Element by element the arithmetic is that of the one-shot
    formula; DARE's masks come from per-slice generators (the same seed gives the same
    bytes, whatever the order or the number of threads).

    The inputs may be in their stored dtype (zero-copy views of the files): each slice is
    widened to float32 as it is used, so no input ever exists whole in float32. Where
    :mod:`engine.kernels` can run (numba, bf16/float32 on the CPU) both passes are fused loops.
    """
    if kernels.fits(call.tensors, call.out_dtype):
        return _sparse_merge_kernels(call, sparsifier, consensus)
    return _sparse_merge_torch(call, sparsifier, consensus)


def _compute_dtype(call: MergeCall) -> torch.dtype:
    return torch.float64 if call.base.dtype == torch.float64 else torch.float32


MAGNITUDE = ("magnitude", "magnitude_outliers")


def _ranks(call: MergeCall, i: int, sparsifier: Sparsifier, n: int) -> tuple[int, int] | None:
    params = call.input_params[i]
    gamma = float(params["gamma"]) if sparsifier == "magnitude_outliers" else None
    return _magnitude_ranks(n, float(params.get("density", 1.0)), gamma)


def _keeps_random(call: MergeCall, others: Sequence[int]) -> list[_Keep]:
    keeps = []
    for i in others:
        density = float(call.input_params[i].get("density", 1.0))
        keeps.append(_Keep("all") if density >= 1 else _Keep("random", density=density, seed=call.seeds[i]))
    return keeps


def _della_row_length(shape: torch.Size) -> int:
    """The length of DELLA's rows (a 1-D tensor is one row; else along dim 1, 2-D only)."""
    return max(1, int(shape[1]) if len(shape) >= 2 else math.prod(shape))


def _keeps_della(call: MergeCall, others: Sequence[int]) -> list[_Keep]:
    row = _della_row_length(call.base.shape)
    keeps = []
    for i in others:
        params = call.input_params[i]
        density = float(params.get("density", 1.0))
        keeps.append(
            _Keep("all")
            if density >= 1
            else _Keep(
                "della", density=density, seed=call.seeds[i], epsilon=float(params["epsilon"]), row=row
            )
        )
    return keeps


def _spans(n: int, step: int, row: int | None) -> list[tuple[int, int]]:
    """The slices ``[start, end)`` of a flat tensor of ``n`` elements, about ``step`` long.

    With ``row`` (DELLA), slices hold whole rows: each begins at the first row that starts in
    its block of ``step`` elements, so its random draws begin near a block boundary.
    """
    if row is None:
        return [(start, min(start + step, n)) for start in range(0, n, step)]
    cuts = sorted({min(n, -(-(k * step) // row) * row) for k in range(-(-n // step) + 1)})
    return [(start, end) for start, end in itertools.pairwise(cuts) if start < end]


def _sparse_merge_torch(call: MergeCall, sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    compute = _compute_dtype(call)
    base = call.base
    others = call.others()
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])
    flat_base = base.reshape(-1)
    flats = [call.tensors[i].reshape(-1) for i in others]
    n = flat_base.numel()
    on_cpu = base.device.type == "cpu"
    step = SLICE if on_cpu else max(n, 1)  # a GPU takes the whole tensor at once
    della = sparsifier == "della_magprune"
    spans = _spans(n, step, _della_row_length(base.shape) if della and on_cpu else None)
    parallel = on_cpu and n > SLICE

    def density_of(i: int) -> float:
        return float(call.input_params[i].get("density", 1.0))

    def delta(flat: torch.Tensor, b: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return flat[start:end].to(compute) - b  # a fresh tensor: the slice's own temporary

    if sparsifier in MAGNITUDE:
        keeps = map_on_cores(
            lambda i: _plan_trim(
                call.tensors[i].to(compute) - base.to(compute), _ranks(call, i, sparsifier, n), rescale
            ),
            others,
            parallel=parallel,
            workers=len(others),
        )
    else:
        keeps = _keeps_della(call, others) if della else _keeps_random(call, others)
        if rescale and any(k.kind in ("random", "della") for k in keeps):

            def norms(span: tuple[int, int]) -> list[tuple[float, float]]:
                start, end = span
                b = flat_base[start:end].to(compute)
                pairs = []
                for flat, keep in zip(flats, keeps, strict=True):
                    d = delta(flat, b, start, end)
                    mask = keep.mask(d, start)
                    total = float(torch.linalg.vector_norm(d, 1, dtype=torch.float64))
                    kept = (
                        total
                        if mask is None
                        else float(torch.linalg.vector_norm(d * mask, 1, dtype=torch.float64))
                    )
                    pairs.append((total, kept))
                return pairs

            per_slice = map_on_cores(norms, spans, parallel=parallel)
            keeps = [
                replace(
                    keep, scale=l1_scale(sum(p[m][0] for p in per_slice), sum(p[m][1] for p in per_slice))
                )
                if keep.kind in ("random", "della")
                else keep
                for m, keep in enumerate(keeps)
            ]

    normalize = bool(call.params["normalize"])
    lam = float(call.params["lambda"])
    out = torch.empty(n, dtype=call.out_dtype or compute, device=base.device)

    def merge_slice(span: tuple[int, int]) -> None:
        start, end = span
        b = flat_base[start:end].to(compute)
        rows = []
        for flat, keep, weight in zip(flats, keeps, weights, strict=True):
            d = delta(flat, b, start, end)
            mask = keep.mask(d, start)
            if mask is not None:
                d.mul_(mask)
                if keep.scale != 1.0:
                    d.mul_(keep.scale)
            rows.append(d.mul_(weight))
        totals = torch.zeros_like(b)
        for d in rows:
            totals.add_(d.sign() if consensus == "count" else d)
        out[start:end] = _merge_rows(rows, weights, b, totals, consensus, normalize, lam)

    map_on_cores(merge_slice, spans, parallel=parallel)
    return out.reshape(base.shape)


PASS1_SLICE = 1 << 20  # elements per histogram pass job: streaming, so larger than SLICE


def _kernel_cut(
    model: np.ndarray, base: np.ndarray, n: int, k: int, sums: bool, sample: np.ndarray | None = None
) -> tuple[_Cut, float, float]:
    """The exact top-k cut of ``|model - base|`` by a radix selection on the float32 bit patterns.

    For non-negative floats the bit pattern orders like the value, so two histogram passes
    (the 15 high bits, then the 16 low bits inside the bin that holds the k-th largest) give
    the exact k-th largest value, in linear time and constant memory. For large tensors a
    sample guesses the bins the cut can fall in: one bin (the usual case for bf16 deltas) has
    its low histogram counted in the first pass; several have their entries' patterns gathered
    in it and counted after. Either way the tensors are read once; when the guess misses, the
    second pass reads them again as before (the cut is exact either way). Ties at the cut are
    broken by position, as ``sparsify.topk_cut`` does, with one more pass when needed.
    With ``sums``, also the L1 norms of the whole task vector and of the kept entries.
    ``sample``: :func:`magnitude_sample` of the same model, when the caller has it already.
    """
    starts = range(0, n, PASS1_SLICE)

    def bounds(start: int) -> tuple[int, int]:
        return start, min(start + PASS1_SLICE, n)

    if k <= 0 or k >= n:
        total = 0.0
        if sums:
            total = sum(
                t
                for _, t, _ in map_on_cores(
                    lambda s: kernels.magnitude_sums(model, base, *bounds(s), math.inf, True), starts
                )
            )
        return (NOTHING, total, 0.0) if k <= 0 else (EVERYTHING, total, total)
    if sample is None:
        sample = magnitude_sample(model, base, n)
    window = None if sample is None else _sampled_window(sample, n, k)
    guessed_low: list[np.ndarray] | None = None  # one bin guessed: its low histograms, counted at once
    gathered: list[np.ndarray] | None = None  # several: their patterns, counted once the bin is known
    if window is None:
        high = _summed(map_on_cores(lambda s: kernels.magnitude_histograms(model, base, *bounds(s)), starts))
    elif window[0] == window[1]:
        guess = window[0]
        pairs = map_on_cores(
            lambda s: kernels.magnitude_high_low_histograms(model, base, *bounds(s), guess), starts
        )
        high = _summed([counts for counts, _ in pairs])
        guessed_low = [low for _, low in pairs]
    else:
        parts = map_on_cores(
            lambda s: kernels.magnitude_high_gather(model, base, *bounds(s), *window), starts
        )
        high = _summed([counts for counts, _ in parts])
        gathered = [bits for _, bits in parts]
    high_bin, above = _bin_of_kth(high, k)
    if guessed_low is not None and window is not None and high_bin == window[0]:
        low_parts = guessed_low
    elif gathered is not None and window is not None and window[0] <= high_bin <= window[1]:
        low_parts = map_on_cores(lambda bits: kernels.gathered_low_histogram(bits, high_bin), gathered)
    else:  # no guess, or the guess missed: read the tensors a second time
        low_parts = map_on_cores(
            lambda s: kernels.magnitude_low_histogram(model, base, *bounds(s), high_bin), starts
        )
    guessed_low = gathered = None
    low = _summed(low_parts)
    low_bin, above_low = _bin_of_kth(low, k - above)
    above += above_low
    threshold = float(np.array([(high_bin << 16) | low_bin], dtype=np.uint32).view(np.float32)[0])
    missing = k - above  # entries equal to the threshold that are kept, by position
    last_tie = n - 1
    if missing < int(low[low_bin]):  # the slices' own histograms say where the ties lie
        seen = 0
        for start, part in zip(starts, low_parts, strict=True):
            count = int(part[low_bin])
            if seen + count >= missing:
                last_tie = kernels.nth_equal(model, base, *bounds(start), threshold, missing - seen)
                break
            seen += count
    total = kept = 0.0
    if sums:
        per_slice = map_on_cores(
            lambda s: kernels.magnitude_sums(model, base, *bounds(s), threshold, True), starts
        )
        total = sum(t for _, t, _ in per_slice)
        kept = sum(a for _, _, a in per_slice) + missing * threshold
    return _Cut(threshold, last_tie), total, kept


SAMPLE_MIN = PASS1_SLICE  # smaller tensors take the two passes: guessing would not pay
SAMPLE_BLOCKS, SAMPLE_BLOCK = 16, 4096
MAX_GATHERED = 0.5  # a window holding more of the sample than this is not gathered


def magnitude_sample(model: np.ndarray, base: np.ndarray, n: int) -> np.ndarray | None:
    """The high histogram of a sample of ``|model - base|``; None for a tensor too small to sample."""
    if n < SAMPLE_MIN:
        return None
    return kernels.sampled_high_histogram(model, base, n, SAMPLE_BLOCKS, SAMPLE_BLOCK)


def _sampled_window(counts: np.ndarray, n: int, k: int) -> tuple[int, int] | None:
    """The high bins the k-th largest magnitude very likely lies in, from a sample; None: no guess.

    The window spans the sample's quantiles four standard errors either side of k/n (the
    entries of bf16 deltas crowd into few bins, so it is often a single bin).
    """
    m = int(counts.sum())
    q = k / n
    margin = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
    top_rank = min(m, max(1, math.floor((q - margin) * m)))
    bottom_rank = min(m, max(1, math.ceil((q + margin) * m)))
    high_bin, _ = _bin_of_kth(counts, top_rank)
    low_bin, _ = _bin_of_kth(counts, bottom_rank)
    if counts[low_bin : high_bin + 1].sum() > MAX_GATHERED * m:
        return None
    return low_bin, high_bin


def _kernel_keep(
    model: np.ndarray,
    base: np.ndarray,
    n: int,
    ranks: tuple[int, int] | None,
    rescale: bool,
) -> _Keep:
    if ranks is None:
        return _Keep("all")
    sample = magnitude_sample(model, base, n)  # one for both cuts
    top, total, top_sum = _kernel_cut(model, base, n, ranks[0], rescale, sample)
    drop, _, drop_sum = _kernel_cut(model, base, n, ranks[1], rescale, sample)
    return _Keep("magnitude", l1_scale(total, top_sum - drop_sum) if rescale else 1.0, top, drop)


def _summed(parts: list[np.ndarray]) -> np.ndarray:
    """The sum of the slices' histograms, added in place (``np.sum`` of a list stacks it first)."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def _bin_of_kth(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in the bins above it."""
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k))  # first j with from_top[j] >= k
    return len(counts) - 1 - j, int(from_top[j - 1]) if j > 0 else 0


CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}


def _sparse_merge_kernels(call: MergeCall, sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    base_tensor = call.base
    others = call.others()
    n = base_tensor.numel()
    base = kernels.as_array(base_tensor)
    models = [kernels.as_array(call.tensors[i]) for i in others]
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])
    della = sparsifier == "della_magprune"
    spans = _spans(n, SLICE, _della_row_length(base_tensor.shape) if della else None)

    def della_slice(model: np.ndarray, keep: _Keep, start: int, end: int, row: np.ndarray) -> np.ndarray:
        """``row`` gets the slice's task vector; returns its MagPrune keep mask (a scratch buffer)."""
        mask = scratch("keep", end - start, np.bool_)
        table = della_table(keep.row, keep.density, keep.epsilon, torch.float32).numpy()
        key = draw_key(keep.seed)
        kernels.della_mask(
            model, base, start, end, row_length=keep.row, key=key, table=table, row=row, keep=mask
        )
        return mask

    masks: list[np.ndarray | None] = [None] * len(models)  # DELLA's kept masks, bit-packed
    if sparsifier in MAGNITUDE:
        keeps = [
            _kernel_keep(model, base, n, _ranks(call, i, sparsifier, n), rescale)
            for i, model in zip(others, models, strict=True)
        ]
    else:
        keeps = _keeps_della(call, others) if della else _keeps_random(call, others)
        if rescale and any(k.kind in ("random", "della") for k in keeps):
            # DELLA would rank every row twice, for the norms and for the merge: the first
            # pass's masks are kept instead, a bit per entry (where slices start on a byte)
            if all(start % 8 == 0 for start, _ in spans):
                masks = [np.empty(-(-n // 8), np.uint8) if k.kind == "della" else None for k in keeps]

            def norms(span: tuple[int, int]) -> list[tuple[float, float]]:
                start, end = span
                pairs = []
                for model, keep, bits in zip(models, keeps, masks, strict=True):
                    if keep.kind == "della":
                        row = scratch("della_row", end - start)
                        mask = della_slice(model, keep, start, end, row)
                        pairs.append(kernels.della_sums(row, mask))
                        if bits is not None:
                            bits[start // 8 : -(-end // 8)] = np.packbits(mask)
                    elif keep.kind == "random":
                        key = draw_key(keep.seed)
                        pairs.append(kernels.random_sums(model, base, start, end, key, keep.density))
                    else:
                        pairs.append((0.0, 0.0))
                return pairs

            per_slice = map_on_cores(norms, spans)
            keeps = [
                replace(
                    keep, scale=l1_scale(sum(p[m][0] for p in per_slice), sum(p[m][1] for p in per_slice))
                )
                if keep.kind in ("random", "della")
                else keep
                for m, keep in enumerate(keeps)
            ]

    out_tensor = buffers.empty((n,), call.out_dtype or torch.float32)
    out = kernels.as_array(out_tensor)
    weight_array = np.array(weights, dtype=np.float32)
    total = float(sum(weights))
    weight_sum = 1.0 if consensus is None and abs(total) < 1e-8 else total
    code = CONSENSUS_CODES[consensus]

    def merge_slice(span: tuple[int, int]) -> None:
        start, end = span
        length = end - start
        rows = scratch("rows", len(models) * length).reshape(len(models), length)
        totals = scratch("totals", length)
        totals[:] = 0.0
        for r, (model, keep, weight, bits) in enumerate(zip(models, keeps, weights, masks, strict=True)):
            if keep.kind == "della":
                if bits is None:
                    mask = della_slice(model, keep, start, end, rows[r])
                else:
                    kernels.delta(model, base, start, rows[r])
                    mask = np.unpackbits(bits[start // 8 : -(-end // 8)], count=length).view(np.bool_)
                kernels.della_row(
                    rows[r], mask, scale=keep.scale, weight=weight, totals=totals, count=consensus == "count"
                )
                continue
            kernels.kept_delta_row(
                model,
                base,
                start,
                kind=keep.kind,
                threshold=keep.top.threshold,
                last_tie=keep.top.last_tie,
                drop_threshold=keep.drop.threshold,
                drop_last_tie=keep.drop.last_tie,
                key=draw_key(keep.seed) if keep.kind == "random" else None,
                density=keep.density,
                scale=keep.scale,
                weight=weight,
                row=rows[r],
                totals=totals,
                count=consensus == "count",
            )
        kernels.combine_rows(
            base,
            start,
            end,
            rows=rows,
            weights=weight_array,
            totals=totals,
            consensus=code,
            weight_sum=weight_sum,
            normalize=bool(call.params["normalize"]),
            lam=float(call.params["lambda"]),
            out=out,
        )
        if call.release is not None:  # the inputs' last read: their pages may go
            call.release(start, end)

    map_on_cores(merge_slice, spans, parallel=n > SLICE)
    return out_tensor.reshape(base_tensor.shape)


def generalized_task_arithmetic(
    call: MergeCall, sparsifier: Sparsifier, consensus: Consensus
) -> torch.Tensor:
    base = call.base
    others = call.others()
    if not others:
        return base
    if sparsifier == "della_magprune":  # refuse before any work, whatever the tensor
        for i in others:
            check_della(float(call.input_params[i]["density"]), float(call.input_params[i]["epsilon"]))
        if base.dim() > 2:  # rows along dim 1 are not contiguous: the one-shot formula, widened inputs
            compute = _compute_dtype(call)
            call = replace(call, tensors=[t.to(compute) for t in call.tensors])
            base = call.base
    if (
        sparsifier in ("magnitude", "magnitude_outliers", "random")
        or (sparsifier == "della_magprune" and base.dim() <= 2)
        or (sparsifier is None and kernels.fits(call.tensors, call.out_dtype))
    ):
        return sparse_merge_by_slices(call, sparsifier, consensus)
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])

    weighted = torch.empty((len(others), *base.shape), dtype=base.dtype, device=base.device)
    for row, (i, weight) in enumerate(zip(others, weights, strict=True)):
        delta = call.tensors[i] - base
        density = float(call.input_params[i].get("density", 1.0))
        if sparsifier == "della_magprune":
            epsilon = float(call.input_params[i]["epsilon"])
            delta = della_magprune(delta, density, epsilon, rescale, call.seeds[i])
        weighted[row] = delta.mul_(weight)  # [n_models, *shape]
        del delta

    totals = weighted.sign().sum(dim=0) if consensus == "count" else weighted.sum(dim=0)
    normalize = bool(call.params["normalize"])
    return _merge_rows(
        list(weighted.unbind(0)), weights, base, totals, consensus, normalize, float(call.params["lambda"])
    )


def _spec(
    name: str,
    pretty: str,
    reference: str,
    sparsifier: Sparsifier,
    consensus: Consensus,
    normalize: bool,
    rescale: bool,
) -> MethodSpec:
    params = [
        ParamSpec("weight", "float", Scope.NON_BASE, None, "scale of this model's task vector"),
        ParamSpec(
            "normalize", "bool", Scope.SHARED, normalize, "divide by the sum of the (agreeing) weights"
        ),
        ParamSpec("lambda", "float", Scope.SHARED, 1.0, "scale of the merged task vector"),
        ParamSpec(
            "int8_mask", "bool", Scope.SHARED, False, "accepted for mergekit recipes; no effect on the result"
        ),
    ]
    if sparsifier is not None:
        params.insert(
            1,
            ParamSpec(
                "density",
                "float",
                Scope.NON_BASE,
                1.0,
                "fraction of the task vector to keep",
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
        )
        params.append(
            ParamSpec("rescale", "bool", Scope.SHARED, rescale, "rescale survivors to keep the L1 norm")
        )
    else:
        params.append(ParamSpec("rescale", "bool", Scope.SHARED, rescale, "no effect without sparsification"))
    if sparsifier == "magnitude_outliers":
        params.append(
            ParamSpec(
                "gamma",
                "float",
                Scope.NON_BASE,
                0.01,
                "fraction of the largest task-vector entries to drop as outliers",
                minimum=0.0,
                maximum=1.0,
            )
        )
    if sparsifier == "della_magprune":
        params.append(
            ParamSpec(
                "epsilon",
                "float",
                Scope.NON_BASE,
                0.15,
                "keep probabilities run from density - epsilon (smallest) to density + epsilon (largest)",
            )
        )

    def merge(call: MergeCall) -> torch.Tensor:
        return generalized_task_arithmetic(call, sparsifier, consensus)

    return MethodSpec(
        name=name,
        pretty_name=pretty,
        reference=reference,
        params=tuple(params),
        merge=merge,
        needs_base=True,
        randomized=sparsifier in ("random", "della_magprune"),
        elementwise=sparsifier is None and consensus is None,
        streams=sparsifier in ("magnitude", "magnitude_outliers", "random", "della_magprune")
        or (sparsifier is None and consensus is None),
    )


SPECS = (
    _spec("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", None, None, False, False),
    _spec("ties", "TIES", "https://arxiv.org/abs/2306.01708", "magnitude", "sum", True, False),
    _spec("dare_ties", "DARE-TIES", "https://arxiv.org/abs/2311.03099", "random", "sum", False, True),
    _spec("dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099", "random", None, False, True),
    _spec(
        "breadcrumbs",
        "Model Breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
        "magnitude_outliers",
        None,
        False,
        False,
    ),
    _spec(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "https://arxiv.org/abs/2312.06795",
        "magnitude_outliers",
        "sum",
        False,
        False,
    ),
    _spec("della", "DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", "sum", True, True),
    _spec(
        "della_linear",
        "DELLA (linear)",
        "https://arxiv.org/abs/2406.11617",
        "della_magprune",
        None,
        False,
        True,
    ),
)
