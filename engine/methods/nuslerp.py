"""NuSLERP: spherical interpolation between two models, of task vectors when there is a base.

The interpolation factor comes from the two models' weights, ``t = w_1 / (w_0 + w_1)``
(``t = 0.5`` when they sum to ~0), so equal weights give the midpoint. With a base model
the two task vectors ``model_i - base`` are interpolated and the base added back.

What a "vector" is: the whole tensor, flattened (``nuslerp_flatten``, the default); else
each row (the vectors along the last dimension); or, with ``nuslerp_row_wise``, the
vectors along the first dimension, i.e. the columns of a matrix (mergekit's naming). The angle is measured between unit
vectors (norms clamped at 1e-7, so a zero vector is treated as orthogonal to any other,
as in mergekit), and the coefficients apply to the raw vectors. Where the two are exactly
colinear (``1 - cos^2 <= 1e-16``) the sine vanishes and linear interpolation takes over.

Differences from mergekit 0.1.5: computed in float32 (mergekit uses the input dtype,
often bf16), so the angle and the result are closer to the exact values.
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1), vector by vector.

    Args:
        t: position along the arc.
        v0, v1: tensors of the same shape.
        dim: the dimension that holds each vector; None for the whole tensor as one vector.
    """
    shape = v0.shape
    if v0.numel() == 0:
        return v0.clone()
    if dim is None or v0.dim() == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        a, b = v0.movedim(dim, -1), v1.movedim(dim, -1)  # [..., vector]
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
    cos = ((a * b).sum(dim=-1, keepdim=True) / (norm_a * norm_b)).clamp_(-1.0, 1.0)  # [..., 1]
    colinear = (1 - cos * cos) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    coef_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    out = (a * coef_a).add_(b * coef_b)
    if dim is not None and v0.dim() > 0:
        out = out.movedim(-1, dim)
    return out.reshape(shape)


def nuslerp(call: MergeCall) -> torch.Tensor:
    others = call.others()
    if len(others) != 2:
        raise ValueError(f"nuslerp merges exactly two models besides the base, got {len(others)}")
    w0, w1 = (float(call.input_params[i]["weight"]) for i in others)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = None if call.params["nuslerp_flatten"] else (0 if call.params["nuslerp_row_wise"] else -1)
    x0, x1 = (call.tensors[i] for i in others)
    if call.base_index is None:
        return nuslerp_tensors(t, x0, x1, dim)
    base = call.base
    return nuslerp_tensors(t, x0 - base, x1 - base, dim).add_(base)


SPEC = MethodSpec(
    name="nuslerp",
    pretty_name="NuSLERP",
    reference="https://github.com/arcee-ai/mergekit#nuslerp",
    params=(
        ParamSpec(
            "weight", "float", Scope.NON_BASE, None, "relative weight; t = w_second / (w_first + w_second)"
        ),
        ParamSpec(
            "nuslerp_row_wise",
            "bool",
            Scope.SHARED,
            False,
            "without nuslerp_flatten: interpolate the vectors along the first dimension, not rows",
        ),
        ParamSpec(
            "nuslerp_flatten", "bool", Scope.SHARED, True, "interpolate each tensor as one flattened vector"
        ),
    ),
    merge=nuslerp,
    min_inputs=2,
    max_inputs=3,
    min_non_base=2,
    max_non_base=2,
)
