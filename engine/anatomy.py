"""The merge's anatomy: which parent contributed where, how much the signs fought, how much was dropped.

Observed during the streaming pass: :class:`Anatomy` sees each output tensor's inputs once,
as the engine's reader thread reads them, or as the zero-copy views the streaming methods
use, just before the merge reads them (so the pages are mapped once), and reduces them
slice by slice to a few sums. It never sees or changes what the method computes, so the
merged bytes are the same with or without it. Memory: a few slices per thread, plus, for
tensors whose rows are tokens and are read whole, one aligned copy of the inputs. Views
are observed as stored: where a method rounds inputs to the recipe's ``dtype`` slice by
slice, the anatomy sees them unrounded.

Per tensor, with ``x_i`` its inputs (in the compute dtype) and ``r`` the reference input
(the base model when the recipe has one, else the first input), the sums are the Gram matrix
of ``D_i = x_i - r``, the products ``<x_i, r>``, and, when there is a base, sign counts of the
task vectors. From them, per parent (every sum in float64 over float32 slices):

- **kind** ``task_vector`` (any method with a base model except SLERP): the parent's change
  is its task vector ``D_i``. Its contribution is ``|w_i| * ||D_i||`` (``w_i``: its
  ``weight``, 1 for methods without one); its **share** is its contribution over the sum of
  the parents' contributions. Sparsification is not applied first: the share is of what each
  parent brought to the method.
- **kind** ``distance`` (no base model, and SLERP): the parent's change is its distance
  from the merged tensor, ``x_i - m``, with ``m = sum_j c_j x_j`` computed from the sums
  exactly as the method does (linear: the normalized weights; SLERP: the coefficients of
  :func:`engine.methods.slerp.slerp_coefficients`; other methods: their weighted mean, an
  approximation). Its contribution is its weight share times that distance, ``w~_i * ||x_i
  - m||`` (linear: ``|w_i| / sum |w|``; SLERP: ``1 - t`` for the base, ``t`` for the other).

A layer's contribution per parent is ``sqrt(sum over its tensors of contribution^2)``.

- **sign conflict** (``task_vector`` only): the share of entries where some parents' task
  vectors are positive and others negative, among the entries where at least one is non-zero.
- **dropped** (sparsifying methods only): the share of task-vector entries the sparsifier
  zeroed. TIES and Breadcrumbs keep an exact count per tensor (the top ``max(1, int(density *
  n))``, ties broken by position; Breadcrumbs less its outliers: the method's own rule,
  ``_magnitude_ranks``), so the figure is exact without reading masks. DARE and DELLA draw
  their masks inside the fused kernels; the figure is their expected share, ``1 - density``.
  Entries a consensus step discards are counted under sign conflict, not here.
- **cosine**: between two parents' changes, ``sum of dot products / sqrt(sum ||a||^2 *
  sum ||b||^2)`` over the tensors both have.

The report (:meth:`Anatomy.report`, written as ``merge_report.json``) is::

    {"schema": "mergebot.merge_report/1", "method": str, "base_model": str | null,
     "parents": [str], "kind": "task_vector" | "distance",
     "dropped_kind": "exact" | "expected" | null,
     "layers": [row], "totals": row}
    row = {"layer": "embeddings" | "<index>" | "head" | "other" | "all",
           "tensors": int, "elements": int,
           "shares": {parent: float},          # sums to 1 (0 everywhere when nothing changed)
           "sign_conflict": float | null, "dropped": float | null,
           "cosines": [{"parents": [a, b], "cosine": float | null}]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from engine import anatomy_plot, kernels
from engine.architecture import TIED_HEADS, LayerStack, default_stack, find_stacks, is_pre_weight
from engine.methods.slerp import slerp_coefficients
from engine.methods.task_arithmetic import _magnitude_ranks
from engine.plan import MergePlan, TensorTask
from engine.sources.safetensors_file import DTYPES
from engine.vocab import align_rows

SCHEMA = "mergebot.merge_report/1"
REPORT_NAME = "merge_report.json"
PLOT_NAME = "merge_anatomy.png"
SLICE = 1 << 20  # elements per input per reduction step (the fused loops block it for the cache)

Kind = Literal["task_vector", "distance"]
MAGNITUDE_METHODS = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})
DISTANCE_METHODS = frozenset({"slerp"})


@dataclass
class _Group:
    """The running sums of one layer group."""

    tensors: int = 0
    elements: int = 0
    contrib_sq: dict[str, float] = field(default_factory=dict)
    pairs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # dot, |a|^2, |b|^2
    conflicts: int = 0
    nonzero: int = 0
    dropped: float = 0.0
    entries: int = 0

    def add(self, other: _Group) -> None:
        self.tensors += other.tensors
        self.elements += other.elements
        for name, value in other.contrib_sq.items():
            self.contrib_sq[name] = self.contrib_sq.get(name, 0.0) + value
        for pair, sums in other.pairs.items():
            mine = self.pairs.setdefault(pair, [0.0, 0.0, 0.0])
            for k in range(3):
                mine[k] += sums[k]
        self.conflicts += other.conflicts
        self.nonzero += other.nonzero
        self.dropped += other.dropped
        self.entries += other.entries


def layer_group(name: str, stack: LayerStack | None) -> str:
    """The row a tensor belongs to: its layer index in the language stack, or embeddings, head, other."""
    if stack is not None and (layer := stack.layer_of(name)) is not None:
        return str(layer.index)
    if is_pre_weight(name):
        return "embeddings"
    if name in TIED_HEADS or name.startswith("lm_head.") or name.endswith("score.weight"):
        return "head"
    return "other"


def _reduce(
    tensors: Sequence[torch.Tensor],
    ref: int,
    rows: Sequence[int],
    signs: bool,
    cross: bool,
    pool: Executor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Sums over slices: the Gram matrix of ``D_i = x_i - x_ref``, ``<x_i, x_ref>``, sign conflicts, non-zeros.

    Args:
        rows: the inputs ``i`` whose ``D_i`` are needed (the rest of the matrix may stay 0).
        signs: also count the entries where those ``D_i`` take both signs, and where any is non-zero.
        cross: also sum ``<x_i, x_ref>`` (else it may stay 0).
        pool: threads for the slices of the fused loops of :mod:`engine.kernels`, which run
            where they can (CPU, bf16 or float32). Not ``engine.parallel``'s: that one sets
            torch's thread count, which the merge running meanwhile relies on.
    """
    if kernels.supports(*tensors) and len({t.dtype for t in tensors}) == 1:
        return _reduce_kernels(tensors, ref, rows, signs, cross, pool)
    return _reduce_torch(tensors, ref, rows if signs else [])


def _reduce_kernels(
    tensors: Sequence[torch.Tensor],
    ref: int,
    rows: Sequence[int],
    signs: bool,
    cross: bool,
    pool: Executor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    arrays = tuple(kernels.as_array(t) for t in tensors)
    n = arrays[0].shape[0]
    k = len(arrays)
    gram = np.zeros((k, k), np.float64)
    products = np.zeros(k, np.float64)
    conflicts = nonzero = 0
    chosen = tuple(arrays[i] for i in rows)
    index = np.array(list(rows), dtype=np.intp)
    order = np.array([ref, *rows], dtype=np.intp)

    def one_slice(start: int) -> tuple[np.ndarray[Any, Any], int, int, np.ndarray[Any, Any] | None]:
        end = min(start + SLICE, n)
        if signs:
            part, c, z = kernels.delta_gram_signs(chosen, arrays[ref], start, end)
        else:
            part, c, z = kernels.delta_gram(chosen, arrays[ref], start, end), 0, 0
        raw = kernels.gram((arrays[ref], *chosen), start, end)[0] if cross else None
        return part, c, z, raw

    starts = range(0, n, SLICE)
    parts = pool.map(one_slice, starts) if pool is not None and len(starts) > 1 else map(one_slice, starts)
    for part, c, z, raw in parts:  # summed in slice order: the same sums whatever the threads
        gram[np.ix_(index, index)] += part
        conflicts, nonzero = conflicts + c, nonzero + z
        if raw is not None:
            products[order] += raw
    return torch.from_numpy(gram), torch.from_numpy(products), conflicts, nonzero


def _reduce_torch(
    tensors: Sequence[torch.Tensor], ref: int, signs: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    k = len(tensors)
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    compute = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = flats[0].device
    gram = torch.zeros((k, k), dtype=torch.float64, device=device)
    cross = torch.zeros(k, dtype=torch.float64, device=device)
    conflicts = nonzero = 0
    chosen = list(signs)
    step = SLICE if device.type == "cpu" else max(n, 1)  # a GPU takes the whole tensor at once
    for start in range(0, n, step):
        end = min(start + step, n)
        x = torch.stack([f[start:end].to(compute) for f in flats])  # [k, slice]
        cross += (x @ x[ref]).to(torch.float64)
        d = x.sub_(x[ref].clone())  # [k, slice]: the differences
        gram += (d @ d.T).to(torch.float64)
        if len(chosen) > 1:
            rows = d[chosen]
            positive = (rows > 0).any(0)
            negative = (rows < 0).any(0)
            conflicts += int((positive & negative).sum())
            nonzero += int((positive | negative).sum())
    return gram.cpu(), cross.cpu(), conflicts, nonzero


class Anatomy:
    """Collects the anatomy of one merge, tensor by tensor (see the module's docstring).

    :meth:`observe` is called from one thread at a time, once per output tensor, before its
    merge; :meth:`report` after the last.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.method = plan.method.name
        base_model = next(
            (t.inputs[t.base_index].model for t in plan.tasks if t.base_index is not None), None
        )
        self.base_model = base_model
        self.kind: Kind = (
            "task_vector" if base_model is not None and self.method not in DISTANCE_METHODS else "distance"
        )
        stacks = find_stacks(plan.output_config, [task.name for task in plan.tasks])
        self.stack = default_stack(stacks)
        self.parents: list[str] = []
        for task in plan.tasks:
            for i, item in enumerate(task.inputs):
                if item.model not in self.parents and (self.kind == "distance" or i != task.base_index):
                    self.parents.append(item.model)
        self.groups: dict[str, _Group] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="mergebot-anatomy"
        )
        anatomy_plot.preload()

    def close(self) -> None:
        """Stop the reduction's threads (:meth:`report` still works)."""
        self._pool.shutdown()

    def observe(self, task: TensorTask, inputs: Sequence[torch.Tensor]) -> None:
        """Add one output tensor, from its inputs as read (compute dtype) or as views (stored dtype).

        Read inputs of a tensor whose rows are tokens are aligned to the output vocabulary
        first, as the merge aligns them.
        """
        if not DTYPES[task.dtype][0].is_floating_point or len(task.inputs) < 2:
            return
        tensors = list(inputs)
        if task.vocab_axis is not None and self.plan.vocab is not None:
            base = task.inputs[task.base_index].model if task.base_index is not None else None
            tensors = align_rows(self.plan.vocab, [item.model for item in task.inputs], tensors, base)
        self._add(task, tensors)

    def _add(self, task: TensorTask, tensors: Sequence[torch.Tensor]) -> None:
        models = [item.model for item in task.inputs]
        ref = task.base_index if task.base_index is not None else 0
        task_vector = self.kind == "task_vector" and task.base_index is not None
        others = [i for i in range(len(models)) if i != ref]
        if task_vector:
            needs_cross = False
        elif self.method == "slerp":
            needs_cross = True
        else:  # the reference's own products matter only when the coefficients do not sum to 1
            needs_cross = abs(1.0 - sum(self._linear(task)[0])) > 1e-9
        gram, cross, conflicts, nonzero = _reduce(tensors, ref, others, task_vector, needs_cross, self._pool)
        n = tensors[0].numel()
        group = _Group(tensors=1, elements=n)
        if task_vector:
            dots = gram
            weights = [abs(float(task.input_params[i].get("weight", 1.0))) for i in range(len(models))]
            members = others
            group.conflicts, group.nonzero = conflicts, nonzero
            group.dropped, group.entries = self._dropped(task, others, n)
        else:
            coefficients, weights = self._coefficients(task, gram, cross, ref)
            dots = _deviation_gram(gram, cross, ref, coefficients)
            members = list(range(len(models)))
        for i in members:
            name = models[i]
            group.contrib_sq[name] = weights[i] ** 2 * max(float(dots[i, i]), 0.0)
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                key = (models[a], models[b])
                if self.parents.index(key[0]) > self.parents.index(key[1]):
                    key = (key[1], key[0])
                group.pairs[key] = [float(dots[a, b]), float(dots[a, a]), float(dots[b, b])]
        self.groups.setdefault(layer_group(task.name, self.stack), _Group()).add(group)

    def _coefficients(
        self, task: TensorTask, gram: torch.Tensor, cross: torch.Tensor, ref: int
    ) -> tuple[list[float], list[float]]:
        """The merged tensor as ``sum_j c_j x_j`` (the ``c_j``) and each input's weight share."""
        k = len(task.inputs)
        if self.method == "slerp" and k == 2 and task.base_index is not None:
            other = 1 - task.base_index
            t = float(task.params["t"])
            norm_base = math.sqrt(max(float(cross[ref]), 0.0))
            other_sq = (
                float(gram[other, other]) + 2 * (float(cross[other]) - float(cross[ref])) + float(cross[ref])
            )
            coef_a, coef_b = slerp_coefficients(
                t, norm_base, math.sqrt(max(other_sq, 0.0)), float(cross[other])
            )
            coefficients = [0.0, 0.0]
            coefficients[task.base_index], coefficients[other] = coef_a, coef_b
            shares = [0.0, 0.0]
            shares[task.base_index], shares[other] = 1.0 - t, t
            return coefficients, shares
        return self._linear(task)

    def _linear(self, task: TensorTask) -> tuple[list[float], list[float]]:
        """A weighted mean's coefficients and weight shares (linear's own rule for ``normalize``)."""
        weights = [float(p.get("weight", 1.0)) for p in task.input_params]
        total = sum(weights)
        normalize = bool(task.params.get("normalize", True)) or self.method != "linear"
        coefficients = [w / total for w in weights] if normalize and total != 0 else weights
        absolute = sum(abs(w) for w in weights) or 1.0
        return coefficients, [abs(w) / absolute for w in weights]

    def _dropped(self, task: TensorTask, others: Sequence[int], n: int) -> tuple[float, int]:
        """Entries the sparsifier zeroed, summed over the parents, and the entries it saw."""
        if self.method not in MAGNITUDE_METHODS | RANDOM_METHODS:
            return 0.0, 0
        dropped = 0.0
        for i in others:
            params = task.input_params[i]
            density = float(params.get("density", 1.0))
            if self.method in RANDOM_METHODS:
                dropped += (1.0 - min(density, 1.0)) * n
                continue
            gamma = float(params["gamma"]) if self.method.startswith("breadcrumbs") else None
            ranks = _magnitude_ranks(n, density, gamma)
            dropped += 0 if ranks is None else n - (ranks[0] - ranks[1])
        return dropped, n * len(others)

    @property
    def dropped_kind(self) -> Literal["exact", "expected"] | None:
        if self.method in MAGNITUDE_METHODS:
            return "exact"
        if self.method in RANDOM_METHODS:
            return "expected"
        return None

    def report(self) -> dict[str, Any]:
        """The anatomy as the JSON-ready dictionary of the module's docstring."""
        names = [name for name in self.groups if name == "embeddings"]
        names += sorted((name for name in self.groups if name.isdigit()), key=int)
        names += [name for name in ("head", "other") if name in self.groups]
        total = _Group()
        for name in names:
            total.add(self.groups[name])
        return {
            "schema": SCHEMA,
            "method": self.method,
            "base_model": self.base_model,
            "parents": list(self.parents),
            "kind": self.kind,
            "dropped_kind": self.dropped_kind,
            "layers": [self._row(name, self.groups[name]) for name in names],
            "totals": self._row("all", total),
        }

    def _row(self, name: str, group: _Group) -> dict[str, Any]:
        contributions = {p: math.sqrt(group.contrib_sq.get(p, 0.0)) for p in self.parents}
        whole = sum(contributions.values())
        return {
            "layer": name,
            "tensors": group.tensors,
            "elements": group.elements,
            "shares": {p: (c / whole if whole > 0 else 0.0) for p, c in contributions.items()},
            "sign_conflict": (group.conflicts / group.nonzero if group.nonzero else 0.0)
            if self.kind == "task_vector"
            else None,
            "dropped": (group.dropped / group.entries if group.entries else 0.0)
            if self.dropped_kind is not None
            else None,
            "cosines": [
                {
                    "parents": [a, b],
                    "cosine": _cosine(*group.pairs[(a, b)]) if (a, b) in group.pairs else None,
                }
                for i, a in enumerate(self.parents)
                for b in self.parents[i + 1 :]
            ],
        }


def _cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    if sq_a <= 0 or sq_b <= 0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


def _deviation_gram(
    gram: torch.Tensor, cross: torch.Tensor, ref: int, coefficients: Sequence[float]
) -> torch.Tensor:
    """The Gram matrix of ``x_i - m``, ``m = sum_j c_j x_j``, from the sums of :func:`_reduce`.

    On the basis ``(D_0, ..., D_{k-1}, r)`` with ``D_j = x_j - r``: ``x_i - m = D_i - sum_j c_j
    D_j + (1 - sum_j c_j) r``, so no large, nearly equal squared norms are subtracted.
    """
    k = gram.shape[0]
    basis = torch.zeros((k + 1, k + 1), dtype=torch.float64)
    basis[:k, :k] = gram
    ref_sq = float(cross[ref])
    basis[:k, k] = cross - ref_sq
    basis[k, :k] = cross - ref_sq
    basis[k, k] = ref_sq
    c = torch.tensor(list(coefficients), dtype=torch.float64)
    e = torch.zeros((k, k + 1), dtype=torch.float64)
    e[:, :k] = torch.eye(k, dtype=torch.float64) - c.unsqueeze(0)
    e[:, k] = 1.0 - float(c.sum())
    return e @ basis @ e.T


def write_report(report: Mapping[str, Any], folder: str | os.PathLike[str]) -> list[str]:
    """Write ``merge_report.json`` and ``merge_anatomy.png`` into ``folder``; returns their paths."""
    json_path = os.path.join(folder, REPORT_NAME)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    png_path = os.path.join(folder, PLOT_NAME)
    anatomy_plot.plot_report(report, png_path)
    return [json_path, png_path]
