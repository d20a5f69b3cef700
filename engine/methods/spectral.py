"""Spectral task-vector merges: TSV-M, ISO-C and ISO-CTS, one weight matrix at a time.

With task vectors ``d_i = w_i * (model_i - base)`` (``w_i``: the model's ``weight``), each
2-D weight matrix (``[m, n]``, ``r = min(m, n)``) is merged through SVDs:

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

Every other tensor takes the mean of the task vectors times ``alpha``, as in the papers' code
(fusion-bench): 1-D tensors (norms, biases), tensors of more than two dimensions, and also
the matrices indexed by token (input embeddings, output heads), since an SVD of a
vocabulary-sized matrix is costly and these matrices are not what the papers decompose. A
TSV-M matrix with fewer singular values than task vectors (``k = 0``) takes that rule too.

SVDs run in the compute dtype (float32, or float64 when asked for); each task vector is
truncated before the next is formed, so the working set is about one tensor's inputs. There
is no randomness: the same inputs give the same bytes.
"""

from __future__ import annotations

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
        us.append(u[:, :k])  # [m, k]
        ss.append(s[:k])  # [k]
        vhs.append(vh[:k])  # [k, n]
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
    u_c = u[:, :common]  # [m, c]
    us, ss, vhs = [u_c], [s[:common]], [vh[:common]]
    del u, s, vh
    if per_task > 0:
        for delta in deltas():
            specific = delta.sub_(u_c @ (u_c.T @ delta))  # [m, n], off the common subspace
            u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
            del delta, specific, u_t, s_t, vh_t
    u_orth = orthonormal(torch.cat(us, dim=1))  # [m, r]
    vh_orth = orthonormal(torch.cat(vhs, dim=0))  # [r, n]
    return (u_orth * (torch.cat(ss).mean() * alpha)) @ vh_orth


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
)
