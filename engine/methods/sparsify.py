"""Ways to drop most of a task vector before merging.

- by magnitude (TIES): keep the largest entries;
- by magnitude without outliers (Model Breadcrumbs): drop the very largest, then the smallest;
- at random (DARE): keep each entry with probability ``density``;
- at random, by magnitude rank (DELLA's MagPrune): larger entries are likelier to stay.

All keep the survivors' values; ``rescale_l1`` then scales the survivors so the task
vector keeps its L1 norm, which is mergekit's convention for DARE and DELLA (not the
papers' 1/density or 1/p_i; they agree in expectation for DARE).

Differences from mergekit 0.1.5, on purpose:
- ties in magnitude are broken by position (mergekit's unstable sort picks any of them),
  so results are deterministic;
- Breadcrumbs keeps at least one entry of a non-empty tensor, like the magnitude trim
  (mergekit keeps ``int(density * n)``, which is none for a small tensor at low density);
- MagPrune gives a row of one entry the probability ``density`` (mergekit divides by
  ``max rank - min rank = 0`` there and fails on the NaN), and its random draws come from
  a generator seeded per tensor and model, not the global RNG;
- the ``density ± epsilon`` check uses ``|epsilon|``, so a negative epsilon (which favours
  small entries) cannot ask for a probability above 1.
"""

from __future__ import annotations

import functools

import torch

from engine import kernels
from engine.methods.selection import kth_largest


def topk_cut(magnitudes: torch.Tensor, k: int) -> tuple[float, int]:
    """Where the top ``k`` of a flat tensor (0 < k < n) ends: ``(threshold, last_tie)``.

    The top k are the entries above ``threshold`` plus those equal to it at flat positions
    up to ``last_tie`` (-1: none), so ties are broken by position and exactly k are kept.
    An exact selection finds the threshold in linear time instead of sorting the tensor.
    """
    threshold = kth_largest(magnitudes, k)
    missing = k - int(torch.count_nonzero(magnitudes > threshold))
    last_tie = -1
    if missing > 0:
        last_tie = int(torch.nonzero(magnitudes == threshold).squeeze(1)[missing - 1])
    return float(threshold), last_tie


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly the ``k`` largest entries; ties broken by position."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold, last_tie = topk_cut(flat, k)
    keep = flat > threshold
    if last_tie >= 0:
        keep |= (flat == threshold) & (torch.arange(n, device=flat.device) <= last_tie)
    return keep.reshape(magnitude.shape)


def l1_scale(before: float, after: float, eps: float = 1e-7) -> float:
    """The factor that gives survivors the task vector's L1 norm (1.0 for ~zero norms)."""
    return before / after if before >= eps and after >= eps else 1.0


def rescale_l1(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` in place so its L1 norm equals ``original``'s (skipped for ~zero norms)."""
    # float64 accumulation: a float32 sum of millions of terms drifts by ~1e-4, a systematic scale error
    before = float(torch.linalg.vector_norm(original, 1, dtype=torch.float64))
    after = float(torch.linalg.vector_norm(kept, 1, dtype=torch.float64))
    scale = l1_scale(before, after)
    return kept if scale == 1.0 else kept.mul_(scale)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the top ``max(1, int(density * n))`` entries by absolute value."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    kept = delta * topk_mask(delta.abs(), k)
    return rescale_l1(delta, kept) if rescale else kept


DRAW_BLOCK = 1 << 18  # the sliced passes cut tensors at multiples of this many elements

# SplitMix64 (Steele, Lea, Flood 2014): its finalizer turns a counter into 64 well-mixed bits
_KEY = 0xD1B54A32D192ED03  # spreads seeds apart
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def draw_key(seed: int) -> int:
    """The 64-bit key of a seed's stream of draws."""
    return (seed * _KEY) & _U64


def uniform_draws(seed: int, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform [0, 1) draws (float32, 24 random bits) for flat positions [start, start + count).

    Counter-based: the draw at position p is a hash of (seed, p), so any range can be drawn
    alone, in any order, on any thread or device, and gives the same numbers as the whole
    tensor drawn at once. The fused CPU loop and the torch code compute the same integers.
    ``out`` (float32, ``count`` elements) receives them instead of a fresh tensor.
    """
    draws = out if out is not None else torch.empty(count, dtype=torch.float32)
    if count == 0:
        return draws
    key = draw_key(seed)
    if draws.device.type == "cpu" and kernels.supports(draws) and draws.dtype == torch.float32:
        kernels.fill_draws(key, start, kernels.as_array(draws))
    else:
        draws.copy_(_draws_torch(key, start, count, draws.device))
    return draws


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 lanes holding unsigned 64-bit values."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _draws_torch(key: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    # int64 arithmetic wraps around like uint64; only the right shifts need masking
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z += _signed((key + _GAMMA) & _U64)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z ^= _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * 2.0**-24


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, seed: int) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's random drop).

    The random numbers come from a CPU generator seeded per tensor and per model, so the
    same recipe and seed give the same bytes on any device and in any processing order.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    draws = uniform_draws(seed, 0, delta.numel()).reshape(delta.shape)
    kept = delta * (draws < density).to(delta.device)
    return rescale_l1(delta, kept) if rescale else kept


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` share by magnitude, then the smallest.

    Of ``n`` entries, ``keep = max(1, int(density * n))`` survive: those ranked just below
    the ``int(gamma * n)`` largest. When ``keep`` and the outliers together exceed ``n``,
    fewer outliers are dropped so that ``keep`` entries survive (mergekit's rule).
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    keep = max(1, int(density * n))
    top = max(0, int(gamma * n))
    bottom = max(0, n - keep - top)  # entries dropped as too small
    magnitudes = delta.abs()
    # the `n - bottom` largest, less the `n - bottom - keep` largest: exactly `keep` entries
    mask = topk_mask(magnitudes, n - bottom) & ~topk_mask(magnitudes, n - bottom - keep)
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


def check_della(density: float, epsilon: float) -> None:
    """Raise ValueError unless every keep probability ``density ± epsilon`` lies in (0, 1)."""
    if density < 1 and (density - abs(epsilon) <= 0 or density + abs(epsilon) >= 1):
        raise ValueError(
            f"della needs density ± epsilon inside (0, 1), got density {density:g} and epsilon "
            f"{epsilon:g}; lower epsilon or move density away from 0 and 1"
        )


@functools.lru_cache(maxsize=256)
def della_table(
    m: int, density: float, epsilon: float, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """MagPrune's keep probability of each rank in a row of ``m`` entries, in ``dtype``.

    The same operations, in the same dtype and on the same device (a GPU divides by a
    scalar through its reciprocal), as :func:`della_magprune` applies to its ranks, so
    looking a rank up here gives that function's probability bit for bit. Read-only.
    """
    relative = (
        torch.arange(m, device=device).to(dtype).div_(m - 1)
        if m > 1
        else torch.full((1,), 0.5, dtype=dtype, device=device)
    )
    return relative.mul_(2 * epsilon).add_(density - epsilon)


def della_row_mask(rows: torch.Tensor, density: float, epsilon: float, seed: int, start: int) -> torch.Tensor:
    """MagPrune's keep mask of whole rows ``[r, m]`` that begin at flat position ``start``.

    Equal, entry for entry, to the mask :func:`della_magprune` draws for the same rows of
    the whole tensor (contiguous rows: a 1-D tensor or rows along dim 1 of a 2-D one).
    """
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ties ranked by position
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=rows.device).expand_as(order))
    del order
    probs = della_table(m, density, epsilon, rows.dtype, rows.device)[ranks]
    draws = uniform_draws(seed, start, rows.numel()).reshape(rows.shape)
    return draws.to(rows.device) < probs


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, seed: int
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with a probability that grows with its magnitude rank.

    Within each row (the whole tensor if 1-D; along dim 1 otherwise, as mergekit does) the
    entries are ranked by magnitude; rank ``r`` of ``m`` (0 = smallest) is kept with
    probability ``density - epsilon + 2 * epsilon * r / (m - 1)``, so the mean stays
    ``density``. A row of one entry takes ``density``. The draws come from a CPU generator
    seeded per tensor and model, like :func:`bernoulli`; at ``epsilon = 0`` the two give the
    same mask for the same seed.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    check_della(density, epsilon)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ties ranked by position
    ranks = torch.empty_like(order)
    positions = torch.arange(m, device=rows.device).view(1, m, *([1] * (rows.dim() - 2)))
    ranks.scatter_(1, order, positions.expand_as(order))
    del order
    if m > 1:
        relative = ranks.to(delta.dtype).div_(m - 1)  # in [0, 1]
    else:
        relative = torch.full(rows.shape, 0.5, dtype=delta.dtype, device=rows.device)
    del ranks
    probs = relative.mul_(2 * epsilon).add_(density - epsilon).reshape(delta.shape)
    draws = uniform_draws(seed, 0, delta.numel()).reshape(delta.shape)
    kept = delta * (draws.to(delta.device) < probs)
    return rescale_l1(delta, kept) if rescale else kept
