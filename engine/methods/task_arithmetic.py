"""The task-vector family as one generalized merge: task arithmetic, TIES, DARE, Breadcrumbs, DELLA.

For each model, its task vector is ``delta_i = model_i - base``. Optionally each delta is
sparsified (TIES: by magnitude; DARE: at random; Breadcrumbs: by magnitude without the
largest outliers, ``gamma``; DELLA: at random with probabilities by magnitude rank,
``density ± epsilon``; see :mod:`engine.methods.sparsify`), then weighted. With a
consensus step (TIES, DARE-TIES, Breadcrumbs-TIES, DELLA) a sign is elected per element
from the sum of the *weighted* deltas, and only deltas that agree with it are kept. The
merged delta is their sum, divided, when ``normalize`` is on, by the sum of the weights
that took part (per element under consensus), scaled by ``lambda`` and added to the base.

Compatibility notes (mergekit behaviour that recipes rely on, matched on purpose):
- ``ties`` normalizes by default and ``dare_ties`` does not, so DARE-TIES weights are
  absolute scales while TIES weights are relative.
- the sign vote uses the weighted deltas, so a negative weight votes against its model.
- elements where a delta is exactly zero take no part in the divisor.
- mergekit 0.1.5 does not expose its consensus rule (``sum`` or ``count``) as a recipe
  parameter: every method with a consensus step uses ``sum``, and so do we.
Difference: deltas are computed in float32 (mergekit uses the input dtype, often bf16),
which is closer to the exact result.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.selection import kth_largest
from engine.methods.sparsify import bernoulli, check_della, della_magprune, magnitude, magnitude_outliers

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
Consensus = Literal["sum", "count"] | None


def _elect_sign(weighted: torch.Tensor, method: Literal["sum", "count"]) -> torch.Tensor:
    """The elected sign per element (+1 where the total weighted delta, or the vote count, is >= 0)."""
    votes = weighted.sum(dim=0) if method == "sum" else weighted.sign().sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


SLICE = 1 << 18  # elements per slice of the second pass: a few hundred KiB per model, cache-resident


@dataclass(frozen=True)
class _Trim:
    """Which entries of one task vector survive a top-k trim, and by how much they are scaled."""

    threshold: float  # keep |delta| > threshold ...
    last_tie: int  # ... and |delta| == threshold at flat positions <= last_tie (-1: none)
    scale: float  # L1 rescale factor (1.0 when off)
    keep_all: bool


def _plan_trim(delta: torch.Tensor, density: float, rescale: bool) -> _Trim:
    """First pass over one full task vector: the exact top-k cut (see ``sparsify.topk_mask``).

    Takes ownership of ``delta``: it is turned into magnitudes in place, so the pass holds
    one full-size tensor (plus boolean masks), not several.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return _Trim(0.0, -1, 1.0, True)
    k = max(1, int(density * n))
    magnitudes = delta.abs_().reshape(-1)
    threshold = kth_largest(magnitudes, k)
    above = magnitudes > threshold
    missing = k - int(torch.count_nonzero(above))
    last_tie = -1
    if missing > 0:
        last_tie = int(torch.nonzero(magnitudes == threshold).squeeze(1)[missing - 1])
    scale = 1.0
    if rescale:  # L1 norms: the magnitudes' sums, before and after the cut
        before = float(torch.linalg.vector_norm(magnitudes, 1, dtype=torch.float64))
        after = float(magnitudes[above].sum(dtype=torch.float64)) + max(missing, 0) * float(threshold)
        if before >= 1e-7 and after >= 1e-7:
            scale = before / after
    return _Trim(float(threshold), last_tie, scale, False)


def trim_elect_merge(call: MergeCall, consensus: Consensus) -> torch.Tensor:
    """TIES in two passes: exact cuts per model on whole tensors, then everything else by slices.

    Same arithmetic as :func:`generalized_task_arithmetic` element by element, but after
    the first pass every step is elementwise, so it runs over cache-sized slices spread on
    the cores instead of a dozen full-size temporaries streaming through memory.
    """
    base = call.base
    others = call.others()
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])

    def first_pass(i: int) -> _Trim:
        return _plan_trim(call.tensors[i] - base, float(call.input_params[i].get("density", 1.0)), rescale)

    threads = torch.get_num_threads()
    parallel = threads > 1 and base.device.type == "cpu" and base.numel() > SLICE
    if parallel:  # one model per core, each single-threaded: selection does not parallelize well inside torch
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(
                max_workers=min(threads, len(others)), thread_name_prefix="mergebot-trim"
            ) as pool:
                trims = list(pool.map(first_pass, others))
        finally:
            torch.set_num_threads(threads)
    else:
        trims = [first_pass(i) for i in others]
    normalize = bool(call.params["normalize"])
    scale = float(call.params["lambda"])
    flat_base = base.reshape(-1)
    flats = [call.tensors[i].reshape(-1) for i in others]
    out = torch.empty_like(flat_base)
    n = flat_base.numel()

    def merge_slice(start: int) -> None:
        end = min(start + SLICE, n)
        b = flat_base[start:end]
        positions = None
        rows = []
        for flat, trim, weight in zip(flats, trims, weights, strict=True):
            d = flat[start:end] - b
            if not trim.keep_all:
                a = d.abs()
                keep = a > trim.threshold
                if trim.last_tie >= start:
                    if positions is None:
                        positions = torch.arange(start, end)
                    keep |= (a == trim.threshold) & (positions <= trim.last_tie)
                d = d * keep
                if trim.scale != 1.0:
                    d.mul_(trim.scale)
            rows.append(d.mul_(weight))
        merged = torch.zeros_like(b)
        if consensus is not None:
            votes = torch.zeros_like(b)
            for d in rows:
                votes.add_(d if consensus == "sum" else d.sign())
            elected = torch.where(votes >= 0, 1.0, -1.0).to(b.dtype)
            divisor = torch.zeros_like(b)
            for d, weight in zip(rows, weights, strict=True):
                agree = (d * elected) > 0
                merged.add_(d * agree)
                divisor.add_(agree, alpha=weight)
            divisor[divisor == 0] = 1.0
        else:
            for d in rows:
                merged.add_(d)
            total = float(sum(weights))
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=b.dtype)
        if normalize:
            merged /= divisor
        if scale != 1.0:
            merged *= scale
        out[start:end] = merged.add_(b)

    starts = range(0, n, SLICE)
    if parallel:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergebot-ties") as pool:
                list(pool.map(merge_slice, starts))
        finally:
            torch.set_num_threads(threads)
    else:
        for start in starts:
            merge_slice(start)
    return out.reshape(base.shape)


def generalized_task_arithmetic(
    call: MergeCall, sparsifier: Sparsifier, consensus: Consensus
) -> torch.Tensor:
    base = call.base
    others = call.others()
    if not others:
        return base
    if sparsifier == "magnitude":
        return trim_elect_merge(call, consensus)
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])
    if sparsifier == "della_magprune":  # refuse before any work, whatever the tensor
        for i in others:
            check_della(float(call.input_params[i]["density"]), float(call.input_params[i]["epsilon"]))

    weighted = torch.empty((len(others), *base.shape), dtype=base.dtype, device=base.device)
    for row, (i, weight) in enumerate(zip(others, weights, strict=True)):
        delta = call.tensors[i] - base
        density = float(call.input_params[i].get("density", 1.0))
        if sparsifier == "magnitude":
            delta = magnitude(delta, density, rescale)
        elif sparsifier == "random":
            delta = bernoulli(delta, density, rescale, call.seeds[i])
        elif sparsifier == "magnitude_outliers":
            delta = magnitude_outliers(delta, density, float(call.input_params[i]["gamma"]), rescale)
        elif sparsifier == "della_magprune":
            epsilon = float(call.input_params[i]["epsilon"])
            delta = della_magprune(delta, density, epsilon, rescale, call.seeds[i])
        weighted[row] = delta.mul_(weight)  # [n_models, *shape]
        del delta

    if consensus is not None:
        elected = _elect_sign(weighted, consensus)  # [*shape], +1 or -1
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for row, weight in zip(weighted, weights, strict=True):  # one model at a time: small working set
            agree = (row * elected) > 0  # same sign as elected; a zero delta never takes part
            merged.add_(row * agree)
            divisor.add_(agree, alpha=weight)
        divisor[divisor == 0] = 1.0
    else:
        merged = weighted.sum(dim=0)
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=base.dtype)
    if call.params["normalize"]:
        merged /= divisor
    scale = float(call.params["lambda"])
    if scale != 1.0:
        merged *= scale
    return merged.add_(base)


def _spec(
    name: str,
    pretty: str,
    reference: str,
    sparsifier: Sparsifier,
    consensus: Consensus,
    normalize: bool,
    rescale: bool,
) -> MethodSpec:
    params = [
        ParamSpec("weight", "float", Scope.NON_BASE, None, "scale of this model's task vector"),
        ParamSpec(
            "normalize", "bool", Scope.SHARED, normalize, "divide by the sum of the (agreeing) weights"
        ),
        ParamSpec("lambda", "float", Scope.SHARED, 1.0, "scale of the merged task vector"),
        ParamSpec(
            "int8_mask", "bool", Scope.SHARED, False, "accepted for mergekit recipes; no effect on the result"
        ),
    ]
    if sparsifier is not None:
        params.insert(
            1,
            ParamSpec(
                "density",
                "float",
                Scope.NON_BASE,
                1.0,
                "fraction of the task vector to keep",
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
        )
        params.append(
            ParamSpec("rescale", "bool", Scope.SHARED, rescale, "rescale survivors to keep the L1 norm")
        )
    else:
        params.append(ParamSpec("rescale", "bool", Scope.SHARED, rescale, "no effect without sparsification"))
    if sparsifier == "magnitude_outliers":
        params.append(
            ParamSpec(
                "gamma",
                "float",
                Scope.NON_BASE,
                0.01,
                "fraction of the largest task-vector entries to drop as outliers",
                minimum=0.0,
                maximum=1.0,
            )
        )
    if sparsifier == "della_magprune":
        params.append(
            ParamSpec(
                "epsilon",
                "float",
                Scope.NON_BASE,
                0.15,
                "keep probabilities run from density - epsilon (smallest) to density + epsilon (largest)",
            )
        )

    def merge(call: MergeCall) -> torch.Tensor:
        return generalized_task_arithmetic(call, sparsifier, consensus)

    return MethodSpec(
        name=name,
        pretty_name=pretty,
        reference=reference,
        params=tuple(params),
        merge=merge,
        needs_base=True,
        randomized=sparsifier in ("random", "della_magprune"),
        elementwise=sparsifier is None and consensus is None,
    )


SPECS = (
    _spec("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", None, None, False, False),
    _spec("ties", "TIES", "https://arxiv.org/abs/2306.01708", "magnitude", "sum", True, False),
    _spec("dare_ties", "DARE-TIES", "https://arxiv.org/abs/2311.03099", "random", "sum", False, True),
    _spec("dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099", "random", None, False, True),
    _spec(
        "breadcrumbs",
        "Model Breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
        "magnitude_outliers",
        None,
        False,
        False,
    ),
    _spec(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "https://arxiv.org/abs/2312.06795",
        "magnitude_outliers",
        "sum",
        False,
        False,
    ),
    _spec("della", "DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", "sum", True, True),
    _spec(
        "della_linear",
        "DELLA (linear)",
        "https://arxiv.org/abs/2406.11617",
        "della_magprune",
        None,
        False,
        True,
    ),
)
