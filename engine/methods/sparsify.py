"""Ways to drop most of a task vector before merging: by magnitude (TIES) or at random (DARE).

Both keep the survivors' values; ``rescale_l1`` then scales the survivors so the task
vector keeps its L1 norm, which is mergekit's convention for DARE (not the paper's
1/density; the two agree in expectation).
"""

from __future__ import annotations

import torch


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly the ``k`` largest entries; ties broken by position.

    A selection (kthvalue) finds the threshold in linear time instead of sorting the
    whole tensor; entries equal to the threshold are admitted in index order until ``k``.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        first_ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        keep[first_ties] = True
    return keep.reshape(magnitude.shape)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` in place so its L1 norm equals ``original``'s (skipped for ~zero norms)."""
    before = float(original.abs().sum(dtype=torch.float64))
    after = float(kept.abs().sum(dtype=torch.float64))
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the top ``max(1, int(density * n))`` entries by absolute value."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    kept = delta * topk_mask(delta.abs(), k)
    return rescale_l1(delta, kept) if rescale else kept


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, seed: int) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's random drop).

    The random numbers come from a CPU generator seeded per tensor and per model, so the
    same recipe and seed give the same bytes on any device and in any processing order.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
    kept = delta * (draws < density).to(delta.device)
    return rescale_l1(delta, kept) if rescale else kept
