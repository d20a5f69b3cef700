"""SLERP: spherical interpolation between the base and one other model (Shoemake 1985).

The angle is measured between the two whole tensors, flattened. When they are nearly
colinear (|cos| > 0.9995) the sine in the denominator vanishes, so mergekit falls back
to linear interpolation; so do we. The coefficients apply to the raw, unnormalized tensors.
"""

from __future__ import annotations

import math

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) along the great circle between them."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = float(torch.dot(a, b)) / (norm_a * norm_b)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef_a = math.sin((1.0 - t) * theta) / sin_theta
        coef_b = math.sin(t * theta) / sin_theta
    return (v0 * coef_a).add_(v1, alpha=coef_b)


def slerp(call: MergeCall) -> torch.Tensor:
    if len(call.tensors) == 1:
        return call.tensors[0]  # a tensor only one model has passes through, as in mergekit
    other = call.others()[0]
    return slerp_tensors(float(call.params["t"]), call.base, call.tensors[other])


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
)
