"""Linear (model soup): a weighted average of the models, Wortsman et al. 2022."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine import buffers, kernels
from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.parallel import map_on_cores

SLICE = 1 << 18


def linear(call: MergeCall) -> torch.Tensor:
    weights = [float(p["weight"]) for p in call.input_params]
    if call.params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError("the weights sum to 0, so they cannot be normalized; set normalize: false")
        weights = [w / total for w in weights]  # normalized first: one model at any weight is itself
    if kernels.fits(call.tensors, call.out_dtype):
        return fused_weighted_sum(call.tensors, weights, call.out_dtype or torch.float32, call.release)
    out = call.tensors[0] * weights[0]
    for tensor, weight in zip(call.tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


def fused_weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: list[float],
    out_dtype: torch.dtype,
    release: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The weighted sum as one fused loop over slices of the (stored) inputs (``release``: see MergeCall)."""
    shape = tensors[0].shape
    arrays = tuple(kernels.as_array(t) for t in tensors)
    out_tensor = buffers.empty(shape, out_dtype)
    out = kernels.as_array(out_tensor)
    weight_array = np.array(weights, dtype=np.float32)
    n = out.shape[0]

    def merge_slice(start: int) -> None:
        end = min(start + SLICE, n)
        kernels.weighted_sum(arrays, start, end, weight_array, out)
        if release is not None:
            release(start, end)

    map_on_cores(merge_slice, range(0, n, SLICE), parallel=n > SLICE)
    return out_tensor


SPEC = MethodSpec(
    name="linear",
    pretty_name="Linear",
    reference="https://arxiv.org/abs/2203.05482",
    params=(
        ParamSpec("weight", "float", Scope.INPUT, None, "how much of this model goes into the average"),
        ParamSpec("normalize", "bool", Scope.SHARED, True, "divide by the sum of the weights"),
    ),
    merge=linear,
    elementwise=True,
    streams=True,
)
