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
- computed in float32 (mergekit uses the input dtype, often bf16); with the fused kernels
  (a whole-tensor ratio on bf16/float32 inputs), the norms and dot products are summed in
  float64 over slices of the stored inputs, which is more exact still.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine import buffers, kernels
from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.parallel import map_on_cores

SINGULAR = 1e-6
SLICE = 1 << 18


def _ratio(norms: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """The interpolation ratio ``t`` from the task vectors' norms and pairwise dot products."""
    cos_sum = torch.zeros_like(norms[0])
    for (a, b), dot in dots.items():
        product = norms[a] * norms[b]
        cos = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0)
        cos_sum.add_(cos.clamp_(-1.0, 1.0))
    cos = (cos_sum / len(dots)).unsqueeze(-1)  # [..., 1]
    n = len(norms)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def model_stock(call: MergeCall) -> torch.Tensor:
    base = call.base
    others = call.others()
    if len(others) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(others)}")
    per_row = bool(call.params["filter_wise"]) and base.dim() >= 2
    if not per_row and kernels.fits(call.tensors, call.out_dtype):
        return _model_stock_kernels(call, others)
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    tensors = [t if t.dtype == compute else t.to(compute) for t in call.tensors]  # views: widened here
    base = tensors[call.base_index or 0]
    shape = base.shape
    w0 = base if per_row else base.reshape(1, -1)  # [..., row]: one row is the whole tensor
    offsets = [tensors[i].reshape(w0.shape) - w0 for i in others]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]  # [...]
    dots = {
        (a, b): (offsets[a] * offsets[b]).sum(dim=-1)
        for a in range(len(offsets))
        for b in range(a + 1, len(offsets))
    }
    t = _ratio(norms, dots)
    n = len(others)
    average = offsets[0]
    for d in offsets[1:]:
        average.add_(d)
    del offsets
    # t * mean(w_i) + (1 - t) * w_0 == w_0 + t * mean(w_i - w_0)
    return average.mul_(t / n).add_(w0).reshape(shape)


def _model_stock_kernels(call: MergeCall, others: list[int]) -> torch.Tensor:
    """Two passes over slices of the stored inputs: the norms and dot products (float64), then the merge."""
    base = kernels.as_array(call.base)
    models = tuple(kernels.as_array(call.tensors[i]) for i in others)
    n = base.shape[0]
    starts = range(0, n, SLICE)
    grams = map_on_cores(lambda s: kernels.delta_gram(models, base, s, min(s + SLICE, n)), starts)
    gram = np.sum(grams, axis=0) if grams else np.zeros((len(models), len(models)))
    norms = [torch.tensor([math.sqrt(max(gram[a, a], 0.0))], dtype=torch.float32) for a in range(len(models))]
    dots = {
        (a, b): torch.tensor([gram[a, b]], dtype=torch.float32)
        for a in range(len(models))
        for b in range(a + 1, len(models))
    }
    scale = float((_ratio(norms, dots) / len(models)).reshape(()))  # float32 t / n, as the torch path
    out_tensor = buffers.empty(call.base.shape, call.out_dtype or torch.float32)
    out = kernels.as_array(out_tensor)

    def merge_slice(start: int) -> None:
        end = min(start + SLICE, n)
        kernels.scaled_delta_sum(models, base, start, end, scale, out)
        if call.release is not None:  # the inputs' last read: their pages may go
            call.release(start, end)

    map_on_cores(merge_slice, starts, parallel=n > SLICE)
    return out_tensor


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
    streams=True,
)
