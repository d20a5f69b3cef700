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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope
from engine.methods.sparsify import (
    DRAW_BLOCK,
    check_della,
    della_magprune,
    l1_scale,
    magnitude_outliers,
    topk_cut,
    uniform_draws,
)
from engine.parallel import map_on_cores

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
Consensus = Literal["sum", "count"] | None


def _merge_rows(
    rows: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor,
    totals: torch.Tensor,
    consensus: Consensus,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Combine weighted task vectors into the result: vote, keep the agreeing, normalize, add to the base.

    ``totals`` is the rows' sum (for the ``count`` vote: the sum of their signs), computed by
    the caller in whatever order it holds the rows. Rows may be overwritten.
    """
    if consensus is not None:
        elected = torch.where(totals >= 0, 1.0, -1.0).to(base.dtype)  # +1 or -1 per element
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for row, weight in zip(rows, weights, strict=True):  # one model at a time: small working set
            agree = (row * elected) > 0  # same sign as elected; a zero delta never takes part
            merged.add_(row.mul_(agree))
            divisor.add_(agree, alpha=weight)
        divisor[divisor == 0] = 1.0
    else:
        merged = totals
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=base.dtype)
    if normalize:
        merged /= divisor
    if lam != 1.0:
        merged *= lam
    return merged.add_(base)


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
    """First pass over one full task vector: the exact top-k cut (see ``sparsify.topk_cut``).

    Takes ownership of ``delta``: it is turned into magnitudes in place, so the pass holds
    one full-size tensor (plus boolean masks), not several.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return _Keep("all")
    k = max(1, int(density * n))
    magnitudes = delta.abs_().reshape(-1)
    threshold, last_tie = topk_cut(magnitudes, k)
    scale = 1.0
    if rescale:  # L1 norms: the magnitudes' sums, before and after the cut
        above = magnitudes > threshold
        before = float(torch.linalg.vector_norm(magnitudes, 1, dtype=torch.float64))
        after = (
            float(magnitudes[above].sum(dtype=torch.float64))
            + (k - int(torch.count_nonzero(above))) * threshold
        )
        scale = l1_scale(before, after)
    return _Keep("magnitude", scale, threshold, last_tie)


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
    parallel = base.device.type == "cpu" and n > SLICE

    def density_of(i: int) -> float:
        return float(call.input_params[i].get("density", 1.0))

    if sparsifier == "magnitude":
        keeps = map_on_cores(
            lambda i: _plan_trim(call.tensors[i] - base, density_of(i), rescale),
            others,
            parallel=parallel,
            workers=len(others),
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

            per_slice = map_on_cores(norms, starts, parallel=parallel)
            keeps = [
                replace(
                    keep, scale=l1_scale(sum(p[m][0] for p in per_slice), sum(p[m][1] for p in per_slice))
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
        totals = torch.zeros_like(b)
        for d in rows:
            totals.add_(d.sign() if consensus == "count" else d)
        out[start:end] = _merge_rows(rows, weights, b, totals, consensus, normalize, lam)

    map_on_cores(merge_slice, starts, parallel=parallel)
    return out.reshape(base.shape)


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
        if sparsifier == "magnitude_outliers":
            delta = magnitude_outliers(delta, density, float(call.input_params[i]["gamma"]), rescale)
        elif sparsifier == "della_magprune":
            epsilon = float(call.input_params[i]["epsilon"])
            delta = della_magprune(delta, density, epsilon, rescale, call.seeds[i])
        weighted[row] = delta.mul_(weight)  # [n_models, *shape]
        del delta

    totals = weighted.sign().sum(dim=0) if consensus == "count" else weighted.sum(dim=0)
    normalize = bool(call.params["normalize"])
    return _merge_rows(
        list(weighted.unbind(0)), weights, base, totals, consensus, normalize, float(call.params["lambda"])
    )


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
