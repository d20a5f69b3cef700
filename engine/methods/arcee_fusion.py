"""Arcee Fusion: take the other model's value only where it changed the most, and mattered.

With ``a`` the base and ``b`` the other model, each entry's importance is
``|b - a| * KL(softmax(b) || softmax(a))``, the KL divergence taken per row (along the
last dimension; a 1-D tensor is one row) with 1e-8 added to both distributions, as in
mergekit. Entries whose importance reaches the outlier fence of the tensor's
importances, ``median + 1.5 * (Q3 - Q1)``, take ``b``; the rest keep ``a``. The quantiles
are order statistics: quantile ``q`` of ``n`` sorted values is the one at index
``floor(q * (n - 1))`` (no interpolation), as in mergekit.

Differences from mergekit 0.1.5:
- mergekit estimates the quantiles of tensors above 1M entries from 1M entries drawn
  with torch's global RNG; we take exact order statistics of the whole tensor (linear-
  time selection), so the result is exact and needs no randomness.
- the KL divergence is computed as a sum of non-negative second-order terms (see
  :func:`importance`), in float32: within ~1e-4 of the exact value where the textbook
  formula is off by several percent in float32 and is mostly rounding noise in bf16
  (mergekit's dtype for bf16 models), so mergekit's choice of entries near the fence
  often differs from the exact one.
- mergekit returns float32 for bf16 models (its mask is a float32 tensor); we return the
  input dtype, as every method does.
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec

SOFTMAX_EPS = 1e-8


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|b - a|`` scaled by the KL divergence of the rows' softmax distributions."""
    rows_a = a.reshape(1, -1) if a.dim() < 2 else a
    rows_b = b.reshape(1, -1) if b.dim() < 2 else b
    p = torch.softmax(rows_b, dim=-1)
    q = torch.softmax(rows_a, dim=-1).add_(SOFTMAX_EPS)
    # With r = (p - q) / q (eps included), KL = sum q (1 + r) log(1 + r); as sum q r = 0, this is
    # sum q ((1 + r) log1p(r) - r): every term >= 0 and second order in r, so no cancellation.
    # The textbook sum p log(p / q) subtracts first-order terms: ~5% error in float32 for a
    # fine-tune's rows, where KL ~ 1e-6.
    r = p.sub_(q).add_(SOFTMAX_EPS).div_(q)  # [..., row]
    terms = torch.log1p(r).mul_(r + 1).sub_(r).mul_(q)
    del r, q
    kl = terms.sum(dim=-1, keepdim=True)  # [..., 1]
    del terms
    return (rows_b - rows_a).abs_().mul_(kl).reshape(a.shape)


def order_statistic(values: torch.Tensor, q: float) -> torch.Tensor:
    """The value at index ``floor(q * (n - 1))`` of ``values`` sorted ascending (a 0-d tensor)."""
    flat = values.reshape(-1)
    k = int(q * (flat.numel() - 1))
    return torch.kthvalue(flat, k + 1).values


def fusion_mask(scores: torch.Tensor) -> torch.Tensor:
    """Entries at or above the outlier fence ``median + 1.5 * IQR`` of ``scores``."""
    q1, median, q3 = (order_statistic(scores, q) for q in (0.25, 0.5, 0.75))
    return scores >= median + 1.5 * (q3 - q1)  # in the scores' dtype, so a tie is a tie


def arcee_fusion(call: MergeCall) -> torch.Tensor:
    others = call.others()
    if len(others) != 1:
        raise ValueError(f"arcee_fusion takes the base and exactly one other model, got {len(others)} others")
    a, b = call.base, call.tensors[others[0]]
    if a.numel() == 0:
        return a
    mask = fusion_mask(importance(a, b))
    return (b - a).mul_(mask).add_(a)


SPEC = MethodSpec(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    reference="https://arcee.ai",
    params=(),
    merge=arcee_fusion,
    needs_base=True,
    min_inputs=2,
    max_inputs=2,
)
