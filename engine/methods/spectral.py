"""Task-vector merges that work on whole weight matrices: TSV-M, ISO-C, ISO-CTS and WUDI.

With task vectors ``d_i = w_i * (model_i - base)`` (``w_i``: the model's ``weight``), each
2-D weight matrix (``[m, n]``, ``r = min(m, n)``) is merged as a matrix:

- **TSV-M** (Gargiulo et al., CVPR 2025, https://arxiv.org/abs/2412.00081): each ``d_i`` is
  truncated to its top ``k = r // T`` singular triplets (``T`` task vectors); the stacked
  ``U = [U_1 .. U_T]`` ``[m, T k]`` and ``V = [V_1 .. V_T]`` are decorrelated by replacing
  each with its closest orthonormal matrix (``P Qᵀ`` from ``U = P Σ Qᵀ``), and
  ``merged = alpha * U_orth diag(S_1 .. S_T) V_orthᵀ``.
- **ISO-C** (Marczak et al., ICML 2025, https://arxiv.org/abs/2502.04959): the singular
  values of ``Σ_i d_i`` are all replaced by their mean: ``alpha * mean(S) U Vᵀ``.
- **ISO-CTS** (same paper): the top ``c`` directions of ``Σ_i d_i`` form the common subspace,
  with ``c ≈ common_space_fraction * r`` rounded so that the ``r - c`` remaining directions
  split evenly between the tasks; each task adds the top ``(r - c) / T`` singular triplets of
  its ``d_i`` projected off the common subspace; the stacked bases are orthogonalised as in
  TSV-M, and every singular value is set to the mean of the stacked ones, times ``alpha``.
  Where rounding would ask for more than ``r`` directions (a ``common_space_fraction`` near
  0 with few directions) each task gets ``r // T`` (the paper's code slices out of range).
- **WUDI** (Cheng et al., ICML 2025, https://arxiv.org/abs/2503.08099): the merged task
  vector ``t`` minimises ``Σ_i ||(t - d_i) d_iᵀ||² / ||d_i||²`` (Frobenius norms), found by
  ``steps`` steps of Adam (learning rate ``lr``, betas 0.9 and 0.999, eps 1e-8, no weight
  decay) from ``t = Σ_i d_i``; the gradient is taken in closed form,
  ``2 Σ_i (t - d_i) d_iᵀ d_i / ||d_i||²``, so the result needs no autograd and is the same on
  every run. A task vector that is all zeros adds nothing to the loss and is left out of it
  (the paper's code divides by its zero norm). There is no ``alpha``: ``t`` is added as is.

Every other tensor takes the mean of the task vectors times ``alpha`` (WUDI: the mean), as
in the papers' code (fusion-bench): 1-D tensors (norms, biases), tensors of more than two dimensions, and also
the matrices indexed by token (input embeddings, output heads), since an SVD of a
vocabulary-sized matrix is costly and these matrices are not what the papers decompose. A
TSV-M matrix with fewer singular values than task vectors (``k = 0``) takes that rule too.

SVDs and WUDI's steps run in the compute dtype (float32, or float64 when asked for). The
SVD methods truncate each task vector before the next is formed, so their working set is
about one tensor's inputs; WUDI keeps, for an ``[m, n]`` matrix, either ``Σ_i d_iᵀ d_i /
||d_i||²`` ``[n, n]`` when ``n <= T m`` or the task vectors themselves, and costs ``steps``
products of ``[m, n]`` by ``[n, n]`` (or ``2 T`` of ``[m, n]`` by ``[n, m]``) per matrix.
The SVD methods cost, per matrix, ``T + 2`` SVDs (TSV-M), one (ISO-C) or ``T + 3`` (ISO-CTS).
There is no randomness: the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.vocab import has_vocabulary_axis


def _task_vectors(call: MergeCall) -> Iterator[torch.Tensor]:
    """``weight_i * (model_i - base)`` for each model but the base, one at a time."""
    base = call.base
    for i in call.others():
        delta = call.tensors[i] - base
        weight = float(call.input_params[i].get("weight", 1.0))
        yield delta.mul_(weight) if weight != 1.0 else delta


def _decomposed(call: MergeCall) -> bool:
    """Whether this tensor is merged through SVDs (a 2-D matrix not indexed by token)."""
    return call.base.dim() == 2 and not has_vocabulary_axis(call.tensor_name)


def _sum(deltas: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The sum of the task vectors and how many there are."""
    total: torch.Tensor | None = None
    count = 0
    for delta in deltas:
        total = delta if total is None else total.add_(delta)
        count += 1
    if total is None:
        raise ValueError("no task vectors to merge")
    return total, count


def mean_rule(deltas: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """``alpha`` times the mean of the task vectors: the rule for tensors that are not decomposed."""
    total, count = _sum(deltas)
    return total.mul_(alpha / count)


def orthonormal(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix closest to ``x`` in Frobenius norm: ``P Qᵀ`` from ``x = P Σ Qᵀ``."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_delta(deltas: Iterable[torch.Tensor], count: int, alpha: float) -> torch.Tensor | None:
    """TSV-M's merged task vector of ``count`` ``[m, n]`` task vectors, or None when ``r < count``."""
    us: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    vhs: list[torch.Tensor] = []
    for delta in deltas:
        k = min(delta.shape) // count
        if k == 0:
            return None
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        # copies, so the full factors are freed here (a slice would keep each alive)
        us.append(u[:, :k].clone())  # [m, k]
        ss.append(s[:k].clone())  # [k]
        vhs.append(vh[:k].clone())  # [k, n]
        del delta, u, s, vh
    u_orth = orthonormal(torch.cat(us, dim=1))  # [m, T k]
    vh_orth = orthonormal(torch.cat(vhs, dim=0))  # [T k, n]
    return (u_orth * (torch.cat(ss) * alpha)) @ vh_orth  # [m, n]


def iso_c_delta(deltas: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """ISO-C's merged task vector: the spectrum of the summed task vectors flattened to its mean."""
    total, _ = _sum(deltas)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)  # [m, r], [r], [r, n]
    return (u * (s.mean() * alpha)) @ vh


def common_dims(r: int, count: int, fraction: float) -> tuple[int, int]:
    """ISO-CTS's split of ``r`` directions: ``(c, per_task)`` with ``c + count * per_task = r``.

    ``c`` starts at ``int(r * fraction)`` and moves so that the rest divides evenly by the
    number of tasks (rounding ``(r - c) / count`` half to even, as the paper's code does);
    where that rounding would ask for more than ``r`` directions it rounds down.
    """
    common = int(r * fraction)
    per_task = round((r - common) / count)
    if per_task * count > r:
        per_task = r // count
    return r - per_task * count, per_task


def iso_cts_delta(
    deltas: Callable[[], Iterator[torch.Tensor]], fraction: float, alpha: float
) -> torch.Tensor:
    """ISO-CTS's merged task vector; ``deltas`` makes the task vectors afresh on each call."""
    total, count = _sum(deltas())
    u, s, vh = torch.linalg.svd(total, full_matrices=False)  # [m, r], [r], [r, n]
    del total
    common, per_task = common_dims(s.numel(), count, fraction)
    u_c = u[:, :common].clone()  # [m, c]; copies, so the full factors are freed below
    us, ss, vhs = [u_c], [s[:common].clone()], [vh[:common].clone()]
    del u, s, vh
    if per_task > 0:
        for delta in deltas():
            specific = delta.sub_(u_c @ (u_c.T @ delta))  # [m, n], off the common subspace
            u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
            us.append(u_t[:, :per_task].clone())
            ss.append(s_t[:per_task].clone())
            vhs.append(vh_t[:per_task].clone())
            del delta, specific, u_t, s_t, vh_t
    u_orth = orthonormal(torch.cat(us, dim=1))  # [m, r]
    vh_orth = orthonormal(torch.cat(vhs, dim=0))  # [r, n]
    return (u_orth * (torch.cat(ss).mean() * alpha)) @ vh_orth


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def wudi_delta(deltas: Iterable[torch.Tensor], count: int, steps: int, lr: float) -> torch.Tensor:
    """WUDI's merged task vector of ``count`` ``[m, n]`` task vectors: Adam on the interference loss.

    The gradient is ``2 (t A - B)`` with ``A = Σ_i d_iᵀ d_i / ||d_i||²`` ``[n, n]`` and
    ``B = Σ_i d_i d_iᵀ d_i / ||d_i||²`` when ``n <= count * m`` (fewer products per step, and
    ``A`` is no larger than the task vectors); otherwise it is summed task by task.
    """
    total: torch.Tensor | None = None
    gram: torch.Tensor | None = None  # Σ_i d_iᵀ d_i / ||d_i||²  [n, n]
    target: torch.Tensor | None = None  # Σ_i d_i d_iᵀ d_i / ||d_i||²  [m, n]
    kept: list[tuple[torch.Tensor, float]] = []
    for delta in deltas:
        total = delta.clone() if total is None else total.add_(delta)
        norm2 = float(torch.linalg.vector_norm(delta)) ** 2
        if norm2 == 0.0:
            continue  # its loss term is zero whatever t is
        m, n = delta.shape
        if n <= count * m:
            g = (delta.T @ delta).div_(norm2)  # [n, n]
            gram = g if gram is None else gram.add_(g)
            dg = delta @ g  # [m, n]
            target = dg if target is None else target.add_(dg)
        else:
            kept.append((delta, norm2))
    if total is None:
        raise ValueError("no task vectors to merge")

    def gradient(t: torch.Tensor) -> torch.Tensor:
        if gram is not None and target is not None:
            return (t @ gram).sub_(target).mul_(2.0)
        grad = torch.zeros_like(t)
        for d, norm2 in kept:
            grad.add_(((t - d) @ d.T) @ d, alpha=2.0 / norm2)  # [m, m] @ [m, n]
        return grad

    t = total
    if gram is None and not kept:
        return t  # every task vector is zero: so is their sum
    beta1, beta2 = ADAM_BETAS
    exp_avg = torch.zeros_like(t)
    exp_avg_sq = torch.zeros_like(t)
    for step in range(1, steps + 1):
        grad = gradient(t)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(ADAM_EPS)
        t.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    return t


def tsv(call: MergeCall) -> torch.Tensor:
    alpha = float(call.params["alpha"])
    merged = None
    if _decomposed(call):
        merged = tsv_delta(_task_vectors(call), len(call.others()), alpha)
    if merged is None:
        merged = mean_rule(_task_vectors(call), alpha)
    return merged.add_(call.base)


def iso_c(call: MergeCall) -> torch.Tensor:
    alpha = float(call.params["alpha"])
    if not _decomposed(call):
        return mean_rule(_task_vectors(call), alpha).add_(call.base)
    return iso_c_delta(_task_vectors(call), alpha).add_(call.base)


def iso_cts(call: MergeCall) -> torch.Tensor:
    alpha = float(call.params["alpha"])
    if not _decomposed(call):
        return mean_rule(_task_vectors(call), alpha).add_(call.base)
    fraction = float(call.params["common_space_fraction"])
    return iso_cts_delta(lambda: _task_vectors(call), fraction, alpha).add_(call.base)


def wudi(call: MergeCall) -> torch.Tensor:
    if not _decomposed(call):
        return mean_rule(_task_vectors(call), 1.0).add_(call.base)
    steps, lr = int(call.params["steps"]), float(call.params["lr"])
    return wudi_delta(_task_vectors(call), len(call.others()), steps, lr).add_(call.base)


WEIGHT = ParamSpec("weight", "float", Scope.NON_BASE, 1.0, "scale of this model's task vector before merging")


def _alpha(default: float) -> ParamSpec:
    return ParamSpec("alpha", "float", Scope.SHARED, default, "scale of the merged task vector")


SPECS = (
    MethodSpec(
        name="tsv",
        pretty_name="Task Singular Vectors (TSV-M)",
        reference="https://arxiv.org/abs/2412.00081",
        params=(WEIGHT, _alpha(1.0)),
        merge=tsv,
        needs_base=True,
        min_non_base=1,
    ),
    MethodSpec(
        name="iso_c",
        pretty_name="Isotropic merging in a common subspace (ISO-C)",
        reference="https://arxiv.org/abs/2502.04959",
        params=(WEIGHT, _alpha(1.0)),
        merge=iso_c,
        needs_base=True,
        min_non_base=1,
    ),
    MethodSpec(
        name="iso_cts",
        pretty_name="Isotropic merging in common and task-specific subspaces (ISO-CTS)",
        reference="https://arxiv.org/abs/2502.04959",
        params=(
            WEIGHT,
            _alpha(1.0),
            ParamSpec(
                "common_space_fraction",
                "float",
                Scope.SHARED,
                0.8,
                "share of each matrix's directions kept for the common subspace",
                minimum=0.0,
                maximum=1.0,
            ),
        ),
        merge=iso_cts,
        needs_base=True,
        min_non_base=1,
    ),
    MethodSpec(
        name="wudi",
        pretty_name="WUDI merging (data-free interference minimisation)",
        reference="https://arxiv.org/abs/2503.08099",
        params=(
            WEIGHT,
            ParamSpec("steps", "int", Scope.SHARED, 300, "Adam steps per weight matrix", minimum=0),
            ParamSpec("lr", "float", Scope.SHARED, 1e-5, "Adam learning rate", minimum=0.0),
        ),
        merge=wudi,
        needs_base=True,
        min_non_base=1,
    ),
)
