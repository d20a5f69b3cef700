"""Multi-SLERP: a weighted mean of any number of models on the hypersphere (Goddard 2025).

Each model (its task vector ``model_i - base`` when there is a base) is flattened and
split into a norm ``n_i`` and a direction ``u_i = x_i / (n_i + eps)``. The result points
along the weighted mean direction ``M = sum_i w_i u_i`` and has the weighted mean norm:

    merged = (sum_i w_i n_i) * M / |M|        (+ base)

with ``w`` divided by its sum first when ``normalize_weights`` is on.

mergekit writes this as a barycentric step in the tangent space at ``M / |M|``: project
each ``u_i`` onto that space, take the weighted sum, map back with the exponential map.
That weighted sum is exactly zero (``sum_i w_i (u_i - (u_i . m) m) = M - |M| m = 0``), so
the exponential map returns ``M / |M|`` itself; we compute that closed form, which is the
exact value of mergekit's formula without its rounding noise (mergekit computes in the
input dtype, often bf16, and the noise of the zero tangent sum enters its result).

When ``|M| < eps`` (e.g. antipodal models with equal weights) two models fall back to the
linear mix ``w_0 x_0 + w_1 x_1`` (+ base); more models have no defined direction and are
refused, as in mergekit, unless every model is zero (e.g. a norm weight a short fine-tune
left equal to the base's): the merge is then zero (+ base). Difference: weights that sum to 0 cannot be normalized and are
refused (mergekit divides by zero and writes NaN).
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def multislerp_tensors(
    tensors: list[torch.Tensor], weights: list[float], eps: float, base: torch.Tensor | None
) -> torch.Tensor:
    """The Multi-SLERP of ``tensors`` (raw models; task vectors are taken from ``base`` if given)."""
    shape = tensors[0].shape
    norms: list[float] = []
    direction = torch.zeros(tensors[0].numel(), dtype=tensors[0].dtype, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights, strict=True):
        x = (tensor - base if base is not None else tensor).reshape(-1)
        norm = float(torch.linalg.vector_norm(x))
        norms.append(norm)
        direction.add_(x, alpha=weight / (norm + eps))  # sum_i w_i u_i
        del x
    length = float(torch.linalg.vector_norm(direction))
    if all(norm < eps for norm in norms):
        # every model is (the base): zero mean norm, so the direction does not matter
        out = torch.zeros_like(tensors[0])
    elif length < eps:
        if len(tensors) != 2:
            raise ValueError(
                "the weighted directions of the models cancel out (antipodal models with balancing "
                "weights), so multislerp has no direction; change the weights"
            )
        out = torch.zeros_like(tensors[0])
        for tensor, weight in zip(tensors, weights, strict=True):
            out.add_(tensor - base if base is not None else tensor, alpha=weight)
    else:
        mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
        out = direction.mul_(mean_norm / length).reshape(shape)
    return out.add_(base) if base is not None else out


def multislerp(call: MergeCall) -> torch.Tensor:
    others = call.others()
    if not others:
        raise ValueError("multislerp needs at least one model besides the base")
    if len(others) == 1:
        return call.tensors[others[0]]  # nothing to interpolate: that model, as in mergekit
    weights = [float(call.input_params[i]["weight"]) for i in others]
    if call.params["normalize_weights"]:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError(
                "the weights sum to 0, so they cannot be normalized; set normalize_weights: false"
            )
        weights = [w / total for w in weights]
    base = call.base if call.base_index is not None else None
    return multislerp_tensors([call.tensors[i] for i in others], weights, float(call.params["eps"]), base)


SPEC = MethodSpec(
    name="multislerp",
    pretty_name="Multi-SLERP",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params=(
        ParamSpec("weight", "float", Scope.NON_BASE, None, "how much of this model goes into the mean"),
        ParamSpec("normalize_weights", "bool", Scope.SHARED, True, "divide the weights by their sum"),
        ParamSpec(
            "eps", "float", Scope.SHARED, 1e-8, "added to norms before dividing; smaller means more exact"
        ),
    ),
    merge=multislerp,
    min_non_base=1,
)
