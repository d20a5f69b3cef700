"""Passthrough: copy one model's tensor, optionally scaled; with slices it stacks layers."""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def passthrough(call: MergeCall) -> torch.Tensor:
    (tensor,) = call.tensors
    scale = call.input_params[0].get("scale")
    return tensor if scale is None or float(scale) == 1.0 else tensor * float(scale)


SPEC = MethodSpec(
    name="passthrough",
    pretty_name="Passthrough",
    reference="https://github.com/arcee-ai/mergekit#passthrough",
    params=(ParamSpec("scale", "float", Scope.INPUT, 1.0, "multiply the copied tensor by this factor"),),
    merge=passthrough,
    elementwise=True,
    max_inputs=1,
)
