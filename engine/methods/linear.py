"""Linear (model soup): a weighted average of the models, Wortsman et al. 2022."""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def linear(call: MergeCall) -> torch.Tensor:
    weights = [float(p["weight"]) for p in call.input_params]
    if call.params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError("the weights sum to 0, so they cannot be normalized; set normalize: false")
        weights = [w / total for w in weights]  # normalized first: one model at any weight is itself
    out = call.tensors[0] * weights[0]
    for tensor, weight in zip(call.tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


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
)
