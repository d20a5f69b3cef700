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

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.selection import kth_largest
from engine.methods.sparsify import (
    DRAW_BLOCK,
    bernoulli,
    check_della,
    della_magprune,
    magnitude,
    magnitude_outliers,
    uniform_draws,
)

_T = TypeVar("_T")
Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
Consensus = Literal["sum", "count"] | None


def _elect_sign(weighted: torch.Tensor, method: Literal["sum", "count"]) -> torch.Tensor:
    """The elected sign per element (+1 where the total weighted delta, or the vote count, is >= 0)."""
    votes = weighted.sum(dim=0) if method == "sum" else weighted.sign().sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


SLICE = DRAW_BLOCK  # elements per slice of the second pass: cache-resident, one block of random draws


@dataclass(frozen=True)
class _Keep:
    """Which entries of one task vector survive, and by how much the survivors are scaled.

    ``magnitude``: |delta| > threshold, plus |delta| == threshold at flat positions <= last_tie.
    ``random``: a Bernoulli(density) draw per entry, from a generator seeded per slice, so
    any slice's mask can be drawn again, in any order, on any thread.
    """

    kind: Literal["all", "magnitude", "random"]
    scale: float = 1.0  # L1 rescale factor (1.0 when off)
    threshold: float = 0.0
    last_tie: int = -1
    density: float = 1.0
    seed: int = 0

    def mask(self, d: torch.Tensor, start: int) -> torch.Tensor | None:
        """The keep mask of the slice of this task vector that begins at ``start`` (None: keep all)."""
        if self.kind == "magnitude":
            a = d.abs()
            keep = a > self.threshold
            if self.last_tie >= start:
                positions = torch.arange(start, start + d.numel(), device=d.device)
                keep |= (a == self.threshold) & (positions <= self.last_tie)
            return keep
        if self.kind == "random":
            return (uniform_draws(self.seed, start, d.numel()) < self.density).to(d.device)
        return None


def _plan_trim(delta: torch.Tensor, density: float, rescale: bool) -> _Keep:
    """First pass over one full task vector: the exact top-k cut (see ``sparsify.topk_mask``).

    Takes ownership of ``delta``: it is turned into magnitudes in place, so the pass holds
    one full-size tensor (plus boolean masks), not several.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return _Keep("all")
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
        after = float(magnitudes[above].sum(dtype=torch.float64)) + missing * float(threshold)
        scale = _l1_scale(before, after)
    return _Keep("magnitude", scale, float(threshold), last_tie)


def _l1_scale(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's L1 rescale: survivors keep the task vector's L1 norm (skipped for ~zero norms)."""
    return before / after if before >= eps and after >= eps else 1.0


def sparse_merge_by_slices(call: MergeCall, sparsifier: Sparsifier, consensus: Consensus) -> torch.Tensor:
    """TIES and DARE in two passes: what each task vector keeps first, then everything else by slices.

    The first pass settles, per model, the exact top-k cut (TIES) or the L1 norms under the
    random mask (DARE); after it every step is elementwise, so the vote and the merge run
    over cache-sized slices spread on the cores instead of a dozen full-size temporaries
    streaming through memory. Element by element the arithmetic is that of the one-shot
    formula; DARE's masks come from per-slice generators (the same seed gives the same
    bytes, whatever the order or the number of threads).
    """
    base = call.base
    others = call.others()
    weights = [float(call.input_params[i]["weight"]) for i in others]
    rescale = bool(call.params["rescale"])
    flat_base = base.reshape(-1)
    flats = [call.tensors[i].reshape(-1) for i in others]
    n = flat_base.numel()
    starts = range(0, n, SLICE)
    threads = torch.get_num_threads()
    parallel = threads > 1 and base.device.type == "cpu" and n > SLICE

    def run(function: Callable[[int], _T], items: Sequence[int], workers: int) -> list[_T]:
        if not parallel:
            return [function(item) for item in items]
        torch.set_num_threads(1)  # one op stream per core: torch's own threads would fight ours
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergebot-merge") as pool:
                return list(pool.map(function, items))
        finally:
            torch.set_num_threads(threads)

    def density_of(i: int) -> float:
        return float(call.input_params[i].get("density", 1.0))

    if sparsifier == "magnitude":
        keeps = run(
            lambda i: _plan_trim(call.tensors[i] - base, density_of(i), rescale),
            others,
            min(threads, len(others)),
        )
    else:
        keeps = [
            _Keep("all") if density_of(i) >= 1 else _Keep("random", density=density_of(i), seed=call.seeds[i])
            for i in others
        ]
        if rescale and any(k.kind == "random" for k in keeps):

            def norms(start: int) -> list[tuple[float, float]]:
                end = min(start + SLICE, n)
                pairs = []
                for flat, keep in zip(flats, keeps, strict=True):
                    d = flat[start:end] - flat_base[start:end]
                    mask = keep.mask(d, start)
                    total = float(torch.linalg.vector_norm(d, 1, dtype=torch.float64))
                    kept = (
                        total
                        if mask is None
                        else float(torch.linalg.vector_norm(d * mask, 1, dtype=torch.float64))
                    )
                    pairs.append((total, kept))
                return pairs

            per_slice = run(norms, starts, threads)
            keeps = [
                replace(
                    keep, scale=_l1_scale(sum(p[m][0] for p in per_slice), sum(p[m][1] for p in per_slice))
                )
                if keep.kind == "random"
                else keep
                for m, keep in enumerate(keeps)
            ]

    normalize = bool(call.params["normalize"])
    lam = float(call.params["lambda"])
    out = torch.empty_like(flat_base)

    def merge_slice(start: int) -> None:
        end = min(start + SLICE, n)
        b = flat_base[start:end]
        rows = []
        for flat, keep, weight in zip(flats, keeps, weights, strict=True):
            d = flat[start:end] - b
            mask = keep.mask(d, start)
            if mask is not None:
                d.mul_(mask)  # d is this slice's own temporary
                if keep.scale != 1.0:
                    d.mul_(keep.scale)
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
                merged.add_(d.mul_(agree))  # d is not used again
                divisor.add_(agree, alpha=weight)
            divisor[divisor == 0] = 1.0
        else:
            for d in rows:
                merged.add_(d)
            total = float(sum(weights))
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=b.dtype)
        if normalize:
            merged /= divisor
        if lam != 1.0:
            merged *= lam
        out[start:end] = merged.add_(b)

    run(merge_slice, starts, threads)
    return out.reshape(base.shape)


def trim_elect_merge(call: MergeCall, consensus: Consensus) -> torch.Tensor:
    """TIES (top-k trim, then the vote) in two passes; see :func:`sparse_merge_by_slices`."""
    return sparse_merge_by_slices(call, "magnitude", consensus)


def generalized_task_arithmetic(
    call: MergeCall, sparsifier: Sparsifier, consensus: Consensus
) -> torch.Tensor:
    base = call.base
    others = call.others()
    if not others:
        return base
    if sparsifier in ("magnitude", "random"):
        return sparse_merge_by_slices(call, sparsifier, consensus)
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
