"""RAM and RAM+ (tensor-local): merge task vectors by who changed what (arXiv 2601.13572).

With task vectors ``d_i = model_i - base``, an entry counts as changed by model ``i`` when
``|d_i| > epsilon``. An entry changed by one model only takes that model's change whole;
an entry changed by several takes the mean of their changes; unchanged entries keep the
base:

    merged = base + sum_i d_i * [changed by i] * (lambda_i if unique else 1 / count)

RAM has ``lambda_i = 1``. RAM+ (tensor-local) boosts the unique changes of a model that
shares much of its change with others: ``rho_i`` is the number of its changed entries
that others changed too over the number only it changed, within this tensor, and
``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``.

Differences from mergekit 0.1.5: where a model changed no entry only it changed,
``rho_i`` is irrelevant (it scales nothing); mergekit divides by ``max(0, epsilon)``,
which is NaN for ``epsilon: 0`` and a model equal to the base, and the NaN spreads to the
whole tensor. We take ``rho_i = 0`` there. Computed in float32 (mergekit uses the input
dtype, often bf16, so its ``|d_i| > epsilon`` test can differ for entries within bf16
rounding of epsilon).
"""

from __future__ import annotations

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope


def ram_merge(call: MergeCall, *, plus: bool) -> torch.Tensor:
    base = call.base
    others = call.others()
    if not others:
        return base
    epsilon = float(call.params["epsilon"])
    deltas = torch.stack([call.tensors[i] - base for i in others])  # [models, *shape]
    changed = torch.stack([d.abs() > epsilon for d in deltas])  # [models, *shape]; one temporary at a time
    count = changed.sum(dim=0)  # [*shape]
    unique = count == 1
    shared = count > 1
    deltas.mul_(changed)

    scales = [1.0] * len(others)
    if plus:
        r, alpha = float(call.params["r"]), float(call.params["alpha"])
        for row in range(len(others)):
            n_shared = int((changed[row] & shared).sum())
            n_unique = int((changed[row] & unique).sum())
            rho = n_shared / max(n_unique, epsilon) if n_unique > 0 else 0.0
            scales[row] = 1.0 + r * min(max(rho, 0.0), alpha)
    del changed

    share = 1.0 / count.clamp(min=1).to(base.dtype)  # [*shape]
    merged = torch.zeros_like(base)  # the merged task vector first: small terms summed before the base
    for delta, scale in zip(deltas, scales, strict=True):
        merged.add_(delta * torch.where(unique, scale, torch.where(shared, share, 0.0)))
    return merged.add_(base)


def ram(call: MergeCall) -> torch.Tensor:
    return ram_merge(call, plus=False)


def ramplus_tl(call: MergeCall) -> torch.Tensor:
    return ram_merge(call, plus=True)


EPSILON = ParamSpec(
    "epsilon",
    "float",
    Scope.SHARED,
    1e-5,
    "a task-vector entry counts as changed when its magnitude exceeds this",
    minimum=0.0,
)

SPECS = (
    MethodSpec(
        name="ram",
        pretty_name="Reinforced Agent Merging",
        reference="https://arxiv.org/abs/2601.13572",
        params=(EPSILON,),
        merge=ram,
        needs_base=True,
    ),
    MethodSpec(
        name="ramplus_tl",
        pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
        reference="https://arxiv.org/abs/2601.13572",
        params=(
            ParamSpec("r", "float", Scope.SHARED, 0.1, "how strongly unique changes are boosted"),
            ParamSpec("alpha", "float", Scope.SHARED, 0.2, "cap on the shared-to-unique ratio rho"),
            EPSILON,
        ),
        merge=ramplus_tl,
        needs_base=True,
    ),
)
