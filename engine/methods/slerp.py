"""SLERP: spherical interpolation between the base and one other model (Shoemake 1985).

The angle is measured between the two whole tensors, flattened. When they are nearly
colinear (|cos| > 0.9995) the sine in the denominator vanishes, so mergekit falls back
to linear interpolation; so do we. The coefficients apply to the raw, unnormalized tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from engine import kernels
from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.linear import fused_weighted_sum
from engine.parallel import map_on_cores

SLICE = 1 << 18

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, norm_a: float, norm_b: float, dot: float) -> tuple[float, float]:
    """The weights of ``v0`` and ``v1`` in the interpolation, from their norms and dot product."""
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) along the great circle between them."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    coef_a, coef_b = slerp_coefficients(
        t, float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)), float(torch.dot(a, b))
    )
    return (v0 * coef_a).add_(v1, alpha=coef_b)


def slerp(call: MergeCall) -> torch.Tensor:
    if len(call.tensors) == 1:
        return call.tensors[0]  # a tensor only one model has passes through, as in mergekit
    other = call.others()[0]
    v0, v1 = call.base, call.tensors[other]
    if kernels.fits([v0, v1], call.out_dtype) and v0.numel():
        return _slerp_kernels(float(call.params["t"]), v0, v1, call.out_dtype or torch.float32, call.release)
    compute = torch.float64 if v0.dtype == torch.float64 else torch.float32
    return slerp_tensors(float(call.params["t"]), v0.to(compute), v1.to(compute))


def _slerp_kernels(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    out_dtype: torch.dtype,
    release: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Two passes over slices of the stored inputs: norms and dot product (float64), then the mix.

    The mix is the torch path's ``v0 * a + v1 * b`` (a fused multiply-add); the norms are
    summed in float64, so the coefficients can differ from the float32 torch path's in their
    last digits (both are within rounding of the exact ones).
    """
    arrays = (kernels.as_array(v0), kernels.as_array(v1))
    n = arrays[0].shape[0]
    starts = range(0, n, SLICE)
    grams = map_on_cores(lambda s: kernels.gram(arrays, s, min(s + SLICE, n)), starts)
    gram = np.sum(grams, axis=0)
    coefficients = slerp_coefficients(t, math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1]), float(gram[0, 1]))
    return fused_weighted_sum([v0, v1], list(coefficients), out_dtype, release)


SPEC = MethodSpec(
    name="slerp",
    pretty_name="SLERP",
    reference="https://en.wikipedia.org/wiki/Slerp",
    params=(
        ParamSpec(
            "t", "float", Scope.SHARED, None, "0 gives the base model, 1 the other", minimum=0.0, maximum=1.0
        ),
    ),
    merge=slerp,
    needs_base=True,
    min_inputs=2,
    max_inputs=2,
    streams=True,
)
