"""Karcher mean: the Riemannian (geodesic) mean of the models' directions on the hypersphere.

Every input counts equally (a base model, if named, is one more input, as in mergekit).
Each tensor, flattened, is split into a norm and a unit direction. Starting from the
normalized average direction, a fixed-point iteration moves the mean along the sphere by
the average of the log maps ``theta_i / sin(theta_i) * (u_i - cos(theta_i) m)`` until that
step is shorter than ``tol`` or ``max_iter`` steps were taken. The result is the mean
direction scaled by the average norm. For two inputs the first guess is already the
geodesic midpoint, so for equal norms it equals SLERP at t = 1/2.

Inputs with norm ``<= tol`` take no part in the direction (their norm still counts in
the average norm); if all are that small, the result is zero. Units are never stored:
each step reads the inputs and divides by their norms on the fly, so the working set is
two tensors beyond the inputs.

Differences from mergekit 0.1.5: mergekit rounds the unit vectors and every step to the
input dtype (often bf16); we keep the float32 compute dtype throughout, which is closer
to the exact mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher mean of ``tensors`` (weights ``alphas``), scaled by their weighted norm."""
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(torch.linalg.vector_norm(x)) for x in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    weights = {i: alphas[i] / alpha_sum for i in valid}

    mean = torch.zeros_like(flat[0])
    for i in valid:
        mean.add_(flat[i], alpha=weights[i] / norms[i])
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < tol:
        mean = flat[valid[0]] / norms[valid[0]]
    else:
        mean.div_(mean_norm)

    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for i in valid:
            cos = max(-1.0, min(1.0, float(torch.dot(mean, flat[i])) / norms[i]))
            theta = math.acos(cos)
            if theta < tol:
                continue
            scale = weights[i] * theta / math.sin(theta)  # log map of u_i at the mean
            tangent.add_(flat[i], alpha=scale / norms[i]).add_(mean, alpha=-scale * cos)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)  # exp map
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean.div_(length)

    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return mean.mul_(scale).reshape(shape)


def karcher(call: MergeCall) -> torch.Tensor:
    n = len(call.tensors)
    return karcher_mean(call.tensors, [1.0 / n] * n, int(call.params["max_iter"]), float(call.params["tol"]))


SPEC = MethodSpec(
    name="karcher",
    pretty_name="Karcher Mean",
    reference="https://arxiv.org/abs/2603.04972",
    params=(
        ParamSpec("max_iter", "int", Scope.SHARED, 10, "most steps of the fixed-point iteration", minimum=0),
        ParamSpec(
            "tol", "float", Scope.SHARED, 1e-5, "stop when a step is shorter than this (radians)", minimum=0.0
        ),
    ),
    merge=karcher,
)
