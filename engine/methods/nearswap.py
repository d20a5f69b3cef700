"""NearSwap: take the other model's value where it is close to the base's (alchemonaut 2024).

Per entry, with ``a`` the base and ``b`` the other model, the weight of ``b`` is
``min(1, t / |a - b|)``: entries that differ by at most ``t`` are swapped in whole, and
farther ones only move ``t`` toward ``b``. So ``t = 0`` gives the base, and a large
``t`` gives the other model.

Difference from mergekit 0.1.5: mergekit divides by ``max(|a - b|, 1e-6)``, so for
``t < 1e-6`` entries that differ by less than 1e-6 (but more than ``t``) move by the wrong
amount; we use the definition as written, which needs no guard (where ``a == b`` the
weight does not matter). Computed in float32 (mergekit uses the input dtype).
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def nearswap_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Move each entry of ``a`` toward ``b`` by at most ``t`` (all the way if within ``t``)."""
    diff = b - a
    distance = diff.abs()
    weight = torch.where(distance > t, t / distance, 1.0).clamp_(min=0.0)  # t / 0 never taken
    return diff.mul_(weight).add_(a)


def nearswap(call: MergeCall) -> torch.Tensor:
    others = call.others()
    if len(others) != 1:
        raise ValueError(f"nearswap takes the base and exactly one other model, got {len(others)} others")
    return nearswap_tensors(float(call.params["t"]), call.base, call.tensors[others[0]])


SPEC = MethodSpec(
    name="nearswap",
    pretty_name="NearSwap",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params=(
        ParamSpec(
            "t", "float", Scope.SHARED, None, "largest difference from the base that is swapped in whole"
        ),
    ),
    merge=nearswap,
    needs_base=True,
    min_inputs=2,
    max_inputs=2,
)
