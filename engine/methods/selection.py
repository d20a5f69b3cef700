"""The exact k-th largest entry of a big tensor, without the copies a full selection makes.

``torch.kthvalue`` copies its input and allocates int64 indices: three times the tensor's
size in temporaries, per model, per tensor. Instead we take a fixed sample, bracket the
answer between two sample quantiles, count what lies above the bracket and select exactly
among the few entries inside it. The result is always the exact k-th value; if the
bracket misses (possible, never seen) we fall back to ``kthvalue``.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 1 << 15
SMALL = 1 << 17  # below this, a plain selection is cheap in time and memory


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest entry of a flat tensor (1 <= k <= n), as a 0-d tensor."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside [1, {n}]")
    if n <= SMALL:
        return torch.kthvalue(values, n - k + 1).values
    # A fixed generator keeps the bracket, and so the speed, reproducible; the answer is exact anyway.
    generator = torch.Generator(device="cpu").manual_seed(n)
    positions = torch.randint(n, (SAMPLE,), generator=generator).to(values.device)
    sample = values[positions].float()
    q = 1.0 - k / n  # the answer's quantile among all values
    margin = 5.0 * math.sqrt(max(q * (1 - q), 1.0 / SAMPLE) / SAMPLE) + 2.0 / SAMPLE
    levels = torch.tensor([max(0.0, q - margin), min(1.0, q + margin)], device=sample.device)
    low, high = (bound.to(values.dtype) for bound in torch.quantile(sample, levels))
    above = int(torch.count_nonzero(values > high))
    if above < k:
        candidates = values[(values >= low) & (values <= high)]
        need = k - above
        if need <= candidates.numel():
            return torch.kthvalue(candidates, candidates.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values
