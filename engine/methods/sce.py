"""SCE: Select, Calculate, Erase: a weight-free merge of task vectors (Wan et al. 2024).

With task vectors ``d_i = model_i - base``:

1. Select: with ``select_topk < 1``, keep only the entries where the models disagree most,
   the top ``int(select_topk * m)`` by variance across models, ``m`` being the number of
   entries whose variance is not zero (mergekit's count); the others are zeroed in every
   ``d_i``. With one model nothing varies, so nothing is selected and the merge is the
   base (as in mergekit).
2. Calculate: each model's weight is the mean square of its (selected) task vector,
   divided by the sum over models.
3. Erase: a sign is elected per entry from the sum of the task vectors; entries that
   disagree with it (or are zero) are erased. The merged task vector is the weighted mean
   of the remaining entries, and the base is added back.

Differences from mergekit 0.1.5:
- mergekit falls back to equal weights when the mean squares sum to less than 1e-6. That
  is a threshold on the scale of the task vectors: a fine-tune whose deltas are ~1e-4
  has mean squares ~1e-8, so on such models mergekit skips the Calculate step. We fall
  back only when every selected task vector is exactly zero.
- mergekit divides by ``max(sum of erased weights, 1e-6)``, which shrinks entries kept by
  only a low-weight model; we divide by the true sum (entries where it is zero keep no
  task vector, as in mergekit).
- ties in variance at the selection cut are broken by position (deterministic).
- ``int8_mask`` is accepted for recipes and has no effect on the result.
- computed in float32 (mergekit uses the input dtype, often bf16).
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.sparsify import topk_mask


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the entries with the largest variance across models (``deltas``: [models, *shape])."""
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = deltas.var(dim=0, unbiased=False)  # [*shape]
    k = int(int(torch.count_nonzero(variance)) * max(fraction, 0.0))
    return topk_mask(variance, k)


def sce(call: MergeCall) -> torch.Tensor:
    base = call.base
    others = call.others()
    if not others:
        return base
    deltas = torch.stack([call.tensors[i] - base for i in others])  # [models, *shape]
    fraction = float(call.params["select_topk"])
    if fraction < 1:
        deltas.mul_(select_by_variance(deltas, fraction))

    energy = [float(d.square().mean()) if d.numel() else 0.0 for d in deltas]
    total = sum(energy)
    weights = [e / total for e in energy] if total > 0 else [1.0 / len(energy)] * len(energy)

    positive = deltas.sum(dim=0) >= 0  # elected sign, [*shape]
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        agree = torch.where(positive, delta > 0, delta < 0)
        merged.add_(delta * agree, alpha=weight)
        divisor.add_(agree, alpha=weight)
    del deltas
    merged.div_(torch.where(divisor > 0, divisor, 1.0))
    return merged.add_(base)


SPEC = MethodSpec(
    name="sce",
    pretty_name="SCE",
    reference="https://arxiv.org/abs/2408.07990",
    params=(
        ParamSpec(
            "select_topk",
            "float",
            Scope.SHARED,
            1.0,
            "fraction of the entries (those that vary across models) to keep, by variance",
            minimum=0.0,
            maximum=1.0,
        ),
        ParamSpec(
            "int8_mask", "bool", Scope.SHARED, False, "accepted for mergekit recipes; no effect on the result"
        ),
    ),
    merge=sce,
    needs_base=True,
)
