"""Every method against its formula on hand-sized tensors, plus the invariants the papers imply."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch

from engine.errors import RecipeError
from engine.methods import METHODS, get_method
from engine.methods.base import MergeCall, ParamValue
from engine.methods.sparsify import bernoulli, magnitude, topk_mask


def call(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None = None,
    params: Mapping[str, ParamValue] | None = None,
    per_model: Sequence[Mapping[str, ParamValue]] | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run a method with its declared defaults filled in, as the planner would."""
    spec = get_method(method)
    shared = {p.name: p.default for p in spec.params if p.scope.value == "shared"}
    shared.update(params or {})
    inputs = []
    for i in range(len(tensors)):
        defaults = {
            p.name: p.default
            for p in spec.params
            if p.scope.value == "input" or (p.scope.value == "non_base" and i != base_index)
        }
        defaults.update((per_model or [{}] * len(tensors))[i])
        inputs.append(defaults)
    return spec.merge(
        MergeCall(
            tensors=[t.double() for t in tensors],
            base_index=base_index,
            params=shared,  # type: ignore[arg-type]
            input_params=inputs,  # type: ignore[arg-type]
            seeds=seeds or list(range(len(tensors))),
        )
    )


def T(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_registry_names_match_mergekit() -> None:
    assert set(METHODS) - BEYOND_MERGEKIT == {  # every method mergekit 0.1.5 registers
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "passthrough",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "sce",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    }


BEYOND_MERGEKIT = {"tsv", "iso_c", "iso_cts", "wudi"}  # engine/methods/spectral.py


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(RecipeError, match=r"Did you mean 'slerp'\?.*Known methods: arcee_fusion"):
        get_method("slurp")


def test_linear_weighted_average_by_hand() -> None:
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    out = call("linear", [a, b], per_model=[{"weight": 1.0}, {"weight": 3.0}])
    assert out.tolist() == [2.5, 3.5]  # (1*1 + 3*3) / 4, (1*2 + 3*4) / 4
    raw = call("linear", [a, b], params={"normalize": False}, per_model=[{"weight": 1.0}, {"weight": 3.0}])
    assert raw.tolist() == [10.0, 14.0]


def test_linear_of_one_model_is_that_model() -> None:
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(call("linear", [x], per_model=[{"weight": 0.7}]), x)


def test_linear_weights_summing_to_zero_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        call("linear", [T([1.0]), T([2.0])], per_model=[{"weight": 1.0}, {"weight": -1.0}])


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    assert torch.allclose(call("slerp", [a, b], base_index=0, params={"t": 0.0}), a)
    assert torch.allclose(call("slerp", [a, b], base_index=0, params={"t": 1.0}), b)
    mid = call("slerp", [a, b], base_index=0, params={"t": 0.5})
    assert torch.allclose(mid, T([math.sqrt(0.5), math.sqrt(0.5)]).double())  # on the circle, not the chord
    # the base is the t=0 end whatever its position among the inputs
    assert torch.allclose(call("slerp", [b, a], base_index=1, params={"t": 0.0}), a)


def test_slerp_keeps_norm_between_unit_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    a, b = a / a.norm(), b / b.norm()
    for t in (0.1, 0.37, 0.8):
        out = call("slerp", [a, b], base_index=0, params={"t": t})
        assert out.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_slerp_falls_back_to_linear_when_colinear() -> None:
    a = T([1.0, 2.0, 3.0])
    b = a * 2.0  # same direction: the angle is 0 and sin(theta) would divide by zero
    out = call("slerp", [a, b], base_index=0, params={"t": 0.25})
    assert torch.allclose(out, 0.75 * a.double() + 0.25 * b.double())


def test_task_arithmetic_by_hand_with_negative_weight_and_lambda() -> None:
    base, skill, harm = T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 3.0])
    out = call(
        "task_arithmetic",
        [base, skill, harm],
        base_index=0,
        params={"lambda": 0.5},
        per_model=[{}, {"weight": 1.0}, {"weight": -1.0}],
    )
    # base + 0.5 * (1*(1,0) - 1*(0,2)) = (1.5, 0)
    assert out.tolist() == [1.5, 0.0]


def test_ties_by_hand() -> None:
    base = T([0.0, 0.0, 0.0, 0.0])
    m1 = T([1.0, -2.0, 3.0, 0.5])
    m2 = T([-1.0, 1.0, 1.0, -0.1])
    out = call("ties", [base, m1, m2], base_index=0, per_model=[{}, {"weight": 1.0}, {"weight": 1.0}])
    # votes (sum of weighted deltas): [0 -> +, -1 -> -, 4 -> +, 0.4 -> +]
    # agreeing: m1 everywhere; m2 only at index 2. Disjoint mean divides by agreeing weights.
    assert out.tolist() == pytest.approx([1.0, -2.0, 2.0, 0.5])


def test_ties_trims_by_magnitude_before_voting() -> None:
    base = T([0.0, 0.0, 0.0, 0.0])
    m1 = T([4.0, 0.1, -0.2, 3.0])
    out = call("ties", [base, m1], base_index=0, per_model=[{}, {"weight": 1.0, "density": 0.5}])
    assert out.tolist() == [4.0, 0.0, 0.0, 3.0]


def test_ties_sign_vote_uses_weighted_deltas() -> None:
    base = T([0.0])
    m1, m2 = T([1.0]), T([-3.0])
    # unweighted, -3 would win; weighted (10 * 1 vs 1 * -3) the positive sign wins
    out = call("ties", [base, m1, m2], base_index=0, per_model=[{}, {"weight": 10.0}, {"weight": 1.0}])
    assert out.tolist() == [1.0]  # 10 * 1 / 10


def test_ties_with_density_one_and_one_model_is_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(1)
    base, ft = torch.randn(50, generator=g), torch.randn(50, generator=g)
    per_model = [{}, {"weight": 0.7, "density": 1.0}]
    ties = call("ties", [base, ft], base_index=0, params={"normalize": False}, per_model=per_model)
    ta = call("task_arithmetic", [base, ft], base_index=0, per_model=[{}, {"weight": 0.7}])
    assert torch.allclose(ties, ta)


def test_dare_with_density_one_is_task_arithmetic_or_ties() -> None:
    g = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(200, generator=g) for _ in range(3))
    per_model = [{}, {"weight": 0.6, "density": 1.0}, {"weight": 0.3, "density": 1.0}]
    ta = call("task_arithmetic", [base, a, b], base_index=0, per_model=per_model)
    assert torch.allclose(call("dare_linear", [base, a, b], base_index=0, per_model=per_model), ta)
    ties = call("ties", [base, a, b], base_index=0, params={"normalize": False}, per_model=per_model)
    assert torch.allclose(call("dare_ties", [base, a, b], base_index=0, per_model=per_model), ties)


def test_passthrough_copies_and_scales() -> None:
    x = T([1.0, -2.0])
    assert torch.equal(call("passthrough", [x]), x.double())
    assert call("passthrough", [x], per_model=[{"scale": 0.5}]).tolist() == [0.5, -1.0]


def test_topk_mask_keeps_exactly_k_even_with_ties() -> None:
    magnitudes = T([1.0, 3.0, 3.0, 3.0, 2.0, 0.0])
    mask = topk_mask(magnitudes, 3)
    assert int(mask.sum()) == 3
    assert mask.tolist() == [False, True, True, True, False, False]
    mask = topk_mask(magnitudes, 2)
    assert mask.tolist() == [False, True, True, False, False, False]  # ties broken by position


def test_magnitude_keeps_at_least_one_entry() -> None:
    x = T([0.1, -5.0, 0.2])
    assert magnitude(x, 0.01, rescale=False).tolist() == [0.0, -5.0, 0.0]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_bernoulli_keeps_density_and_l1_norm(density: float) -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(100_000, generator=g)
    kept = bernoulli(delta, density, rescale=True, seed=11)
    fraction = float((kept != 0).float().mean())
    sigma = math.sqrt(density * (1 - density) / delta.numel())
    assert abs(fraction - density) < 5 * sigma
    assert float(kept.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    survivors = kept != 0
    ratio = kept[survivors] / delta[survivors]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one scale for the whole tensor


def test_bernoulli_is_a_function_of_the_seed() -> None:
    delta = torch.randn(1000)
    assert torch.equal(bernoulli(delta, 0.3, True, seed=5), bernoulli(delta, 0.3, True, seed=5))
    assert not torch.equal(bernoulli(delta, 0.3, True, seed=5), bernoulli(delta, 0.3, True, seed=6))


def test_every_method_declares_documented_parameters() -> None:
    for spec in METHODS.values():
        assert spec.reference.startswith("https://")
        for p in spec.params:
            assert p.doc, f"{spec.name}.{p.name} needs a description"


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_two_pass_ties_equals_the_whole_tensor_formula(
    monkeypatch: pytest.MonkeyPatch, rescale: bool, normalize: bool
) -> None:
    """The sliced TIES pass gives the one-shot formula's numbers, ties at the cut included."""
    import engine.methods.task_arithmetic as ta

    monkeypatch.setattr(ta, "SLICE", 37)  # many ragged slices
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 30, generator=g)
    # bf16-quantized deltas: many exactly equal magnitudes, so the cut falls inside a run of ties
    models = [base + (0.02 * torch.randn(40, 30, generator=g)).to(torch.bfloat16).float() for _ in range(3)]
    weights, densities = [0.5, -0.3, 0.8], [0.3, 0.55, 0.9]
    call_ = MergeCall(
        tensors=[base, *models],
        base_index=0,
        params={"normalize": normalize, "lambda": 0.7, "rescale": rescale, "int8_mask": False},
        input_params=[{}, *({"weight": w, "density": d} for w, d in zip(weights, densities, strict=True))],
        seeds=[0, 1, 2, 3],
    )
    got = ta.sparse_merge_by_slices(call_, "magnitude", "sum")
    rows = []
    for m, w, d in zip(models, weights, densities, strict=True):
        rows.append(magnitude(m - base, d, rescale) * w)
    stacked = torch.stack(rows)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked * elected) > 0
    merged = (stacked * agree).sum(0)
    divisor = (torch.tensor(weights).reshape(-1, 1, 1) * agree).sum(0)
    divisor[divisor == 0] = 1.0
    expected = (merged / divisor if normalize else merged) * 0.7 + base
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 7, 150_000, 199_999, 200_000])
def test_kth_largest_is_exact_on_big_tensors_with_ties(k: int) -> None:
    from engine.methods.selection import kth_largest

    g = torch.Generator().manual_seed(3)
    values = (torch.randn(200_000, generator=g) * 0.02).to(torch.bfloat16).float().abs()
    values[:20_000] = 0.0  # a long run of equal values
    assert float(kth_largest(values, k)) == float(torch.kthvalue(values, values.numel() - k + 1).values)


@pytest.mark.parametrize("consensus", [None, "sum"])
def test_sliced_dare_equals_the_whole_tensor_formula(consensus: str | None) -> None:
    """DARE's masks are drawn per block, so slices and the whole tensor see the same draws."""
    import engine.methods.task_arithmetic as ta

    g = torch.Generator().manual_seed(11)
    n = 3 * ta.SLICE + 1234  # several slices, the last one ragged
    base = torch.randn(n, generator=g)
    models = [base + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    weights, densities, seeds = [0.6, 0.5], [0.3, 0.7], [101, 202]
    call_ = MergeCall(
        tensors=[base, *models],
        base_index=0,
        params={"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False},
        input_params=[{}, *({"weight": w, "density": d} for w, d in zip(weights, densities, strict=True))],
        seeds=[0, *seeds],
    )
    got = ta.sparse_merge_by_slices(call_, "random", consensus)  # type: ignore[arg-type]
    rows = torch.stack(
        [
            bernoulli(m - base, d, True, s) * w
            for m, w, d, s in zip(models, weights, densities, seeds, strict=True)
        ]
    )
    if consensus is None:
        expected = rows.sum(0) + base
    else:
        agree = (rows * torch.where(rows.sum(0) >= 0, 1.0, -1.0)) > 0
        expected = (rows * agree).sum(0) + base
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
