"""Model Stock: average the fine-tunes, then pull the average toward the base (Jang et al. 2024).

With ``N`` fine-tunes ``w_i`` of a base ``w_0``, let ``cos`` be the mean cosine between
their task vectors ``w_i - w_0`` over all pairs. The paper's interpolation ratio

    t = N cos / (1 + (N - 1) cos)

puts the merge at ``t * mean(w_i) + (1 - t) * w_0``: identical fine-tunes (cos = 1) give
``t = 1``, unrelated ones (cos = 0) give the base. Angles are taken over the whole
tensor, or with ``filter_wise`` per row (slices along the last dimension; a 1-D tensor
is one row). Where ``|1 + (N - 1) cos| < 1e-6`` there is no finite ratio and the base
is kept for that row, as in mergekit.

Differences from mergekit 0.1.5:
- mergekit clamps the product of the two norms at 1e-6 before dividing, which shrinks
  the cosine (and with it ``t``) whenever that product is smaller: small task vectors,
  e.g. ``filter_wise`` rows or norm weights of a fine-tune whose deltas are ~1e-5, come
  out nearly orthogonal and the merge falls back toward the base. A cosine does not
  depend on scale, so we divide by the true product and take 0 only where a task vector
  is exactly zero.
- computed in float32 (mergekit uses the input dtype, often bf16).
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope

SINGULAR = 1e-6


def model_stock(call: MergeCall) -> torch.Tensor:
    base = call.base
    others = call.others()
    if len(others) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(others)}")
    shape = base.shape
    per_row = bool(call.params["filter_wise"]) and base.dim() >= 2
    w0 = base if per_row else base.reshape(1, -1)  # [..., row]: one row is the whole tensor
    offsets = [call.tensors[i].reshape(w0.shape) - w0 for i in others]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]  # [...]

    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for a in range(len(offsets)):
        for b in range(a + 1, len(offsets)):
            product = norms[a] * norms[b]
            dot = (offsets[a] * offsets[b]).sum(dim=-1)
            cos = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0)
            cos_sum.add_(cos.clamp_(-1.0, 1.0))
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)  # [..., 1]
    n = len(others)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))

    average = offsets[0]
    for d in offsets[1:]:
        average.add_(d)
    del offsets
    # t * mean(w_i) + (1 - t) * w_0 == w_0 + t * mean(w_i - w_0)
    return average.mul_(t / n).add_(w0).reshape(shape)


SPEC = MethodSpec(
    name="model_stock",
    pretty_name="Model Stock",
    reference="https://arxiv.org/abs/2403.19522",
    params=(
        ParamSpec("filter_wise", "bool", Scope.SHARED, False, "one ratio per row instead of one per tensor"),
    ),
    merge=model_stock,
    needs_base=True,
    min_inputs=3,
    min_non_base=2,
)
