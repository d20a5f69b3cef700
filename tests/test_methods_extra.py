"""The methods beyond linear/SLERP/TIES/DARE, against hand-computed results and their invariants.

Each method is called as the planner calls it: declared defaults filled in, float32
tensors (float64 where a test checks a formula to many digits), one seed per input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch

from engine.config import load_recipe
from engine.errors import RecipeError
from engine.methods import get_method
from engine.methods.arcee_fusion import order_statistic
from engine.methods.base import MergeCall, ParamValue, Scope
from engine.methods.slerp import slerp_tensors
from engine.methods.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers

F32, F64 = torch.float32, torch.float64


def run(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None = None,
    params: Mapping[str, ParamValue] | None = None,
    per_model: Sequence[Mapping[str, ParamValue]] | None = None,
    seeds: Sequence[int] | None = None,
    dtype: torch.dtype = F32,
) -> torch.Tensor:
    """Merge ``tensors`` with ``method``'s declared defaults filled in, as the planner would."""
    spec = get_method(method)
    shared: dict[str, ParamValue] = {
        p.name: p.default for p in spec.params_in(Scope.SHARED) if p.default is not None
    }
    shared.update(params or {})
    inputs = []
    for i in range(len(tensors)):
        scopes = (Scope.INPUT,) if i == base_index else (Scope.INPUT, Scope.NON_BASE)
        values: dict[str, ParamValue] = {
            p.name: p.default for p in spec.params_in(*scopes) if p.default is not None
        }
        values.update((per_model or [{}] * len(tensors))[i])
        inputs.append(values)
    return spec.merge(
        MergeCall(
            tensors=[t.to(dtype) for t in tensors],
            base_index=base_index,
            params=shared,
            input_params=inputs,
            seeds=seeds if seeds is not None else [1000 + i for i in range(len(tensors))],
        )
    )


def T(values: list[float] | list[list[float]], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def randn(*shape: int, seed: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


R = math.sqrt(0.5)


# --- declarations ----------------------------------------------------------------------------------

# name -> {parameter: (scope, default)}, as mergekit 0.1.5 declares them (None: required)
DECLARED: dict[str, dict[str, tuple[str, ParamValue | None]]] = {
    "nuslerp": {
        "weight": ("non_base", None),
        "nuslerp_row_wise": ("shared", False),
        "nuslerp_flatten": ("shared", True),
    },
    "multislerp": {
        "weight": ("non_base", None),
        "normalize_weights": ("shared", True),
        "eps": ("shared", 1e-8),
    },
    "karcher": {"max_iter": ("shared", 10), "tol": ("shared", 1e-5)},
    "model_stock": {"filter_wise": ("shared", False)},
    "sce": {"int8_mask": ("shared", False), "select_topk": ("shared", 1.0)},
    "nearswap": {"t": ("shared", None)},
    "arcee_fusion": {},
    "ram": {"epsilon": ("shared", 1e-5)},
    "ramplus_tl": {"r": ("shared", 0.1), "alpha": ("shared", 0.2), "epsilon": ("shared", 1e-5)},
}
_TASK = {
    "int8_mask": ("shared", False),
    "lambda": ("shared", 1.0),
    "weight": ("non_base", None),
    "density": ("non_base", 1.0),
}
DECLARED["breadcrumbs"] = {
    **_TASK,
    "normalize": ("shared", False),
    "rescale": ("shared", False),
    "gamma": ("non_base", 0.01),
}
DECLARED["breadcrumbs_ties"] = DECLARED["breadcrumbs"]
DECLARED["della"] = {
    **_TASK,
    "normalize": ("shared", True),
    "rescale": ("shared", True),
    "epsilon": ("non_base", 0.15),
}
DECLARED["della_linear"] = {**DECLARED["della"], "normalize": ("shared", False)}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_parameters_are_declared_as_in_mergekit(name: str) -> None:
    spec = get_method(name)
    assert {p.name: (p.scope.value, p.default) for p in spec.params} == DECLARED[name]
    assert spec.reference.startswith("https://")
    assert all(p.doc for p in spec.params)


def test_random_methods_are_flagged() -> None:
    assert get_method("della").randomized and get_method("della_linear").randomized
    assert not get_method("breadcrumbs").randomized and not get_method("sce").randomized


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            "merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: "
            "{weight: 1}}, {model: c, parameters: {weight: 1}}]",
            "nuslerp takes exactly 2 models besides the base model, got 3",
        ),
        (
            "merge_method: nuslerp\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]",
            "nuslerp takes exactly 2 models besides the base model, got 1",
        ),
        (
            "merge_method: model_stock\nbase_model: base\nmodels: [{model: a}]",
            "model_stock needs at least 3 models",
        ),
        ("merge_method: nearswap\nbase_model: a\nmodels: [{model: a}, {model: b}]", "needs `t`"),
        (
            "merge_method: sce\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {select_topk: 1.5}",
            "must be at most 1",
        ),
    ],
)
def test_recipes_are_checked_against_the_new_contracts(recipe: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_nuslerp_without_base_and_with_base_are_valid_recipes() -> None:
    two = "models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 2}}]"
    load_recipe(f"merge_method: nuslerp\n{two}")
    load_recipe(f"merge_method: nuslerp\nbase_model: base\n{two}")


# --- NuSLERP ---------------------------------------------------------------------------------------


def nus(tensors: Sequence[torch.Tensor], weights: tuple[float, float], **kw: object) -> torch.Tensor:
    base_index = kw.pop("base_index", None)
    per_model = [{"weight": w} for w in weights]
    if isinstance(base_index, int):
        per_model.insert(base_index, {})
    return run(
        "nuslerp",
        tensors,
        base_index=base_index if isinstance(base_index, int) else None,
        per_model=per_model,
        params=kw,  # type: ignore[arg-type]
        dtype=F64,
    )


def test_nuslerp_t_comes_from_the_weights() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(nus([a, b], (1.0, 1.0)), T([R, R]))  # equal weights: midpoint
    quarter = nus([a, b], (1.0, 3.0))  # t = 3 / 4 of the way to b: 67.5 degrees
    torch.testing.assert_close(quarter, T([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)]))
    torch.testing.assert_close(nus([a, b], (1.0, 0.0)), a)
    torch.testing.assert_close(nus([a, b], (1.0, -1.0)), T([R, R]))  # weights sum to 0: t = 1/2


def test_nuslerp_equal_weights_are_symmetric() -> None:
    a, b = randn(6, 8, seed=1, dtype=F64), randn(6, 8, seed=2, dtype=F64)
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        kw = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        torch.testing.assert_close(nus([a, b], (0.4, 0.4), **kw), nus([b, a], (0.4, 0.4), **kw))
        torch.testing.assert_close(nus([a, b], (1.0, 3.0), **kw), nus([b, a], (3.0, 1.0), **kw))


def test_nuslerp_flattened_is_slerp_of_the_whole_tensor() -> None:
    a, b = randn(5, 7, seed=3, dtype=F64), randn(5, 7, seed=4, dtype=F64)
    torch.testing.assert_close(nus([a, b], (1.0, 2.0)), slerp_tensors(2 / 3, a, b))


def test_nuslerp_rows_and_columns_by_hand() -> None:
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[0.0, 1.0], [1.0, 0.0]])
    rows = nus([a, b], (1.0, 1.0), nuslerp_flatten=False)
    torch.testing.assert_close(rows, T([[R, R], [1.0, 0.0]]))  # second row colinear: linear
    columns = nus([a, b], (1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=True)
    # first column: [1, 1] -> [0, 1], 45 degrees apart; second: [0, 0] -> [1, 0], where a zero
    # vector counts as orthogonal (mergekit's convention), so it takes sin(pi/4) of [1, 0]
    theta = math.pi / 4
    first = (math.sin(theta / 2) * T([1.0, 1.0]) + math.sin(theta / 2) * T([0.0, 1.0])) / math.sin(theta)
    torch.testing.assert_close(columns[:, 0], first)
    torch.testing.assert_close(columns[:, 1], T([R, 0.0]))


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    base = T([1.0, 1.0, 1.0])
    a, b = base + T([1.0, 0.0, 0.0]), base + T([0.0, 2.0, 0.0])
    out = nus([a, base, b], (1.0, 1.0), base_index=1)
    # |d_a| = 1, |d_b| = 2, orthogonal: (sin(pi/4) d_a + sin(pi/4) d_b) / sin(pi/2)
    torch.testing.assert_close(out, base + R * T([1.0, 2.0, 0.0]))


def test_nuslerp_needs_two_models_besides_the_base() -> None:
    with pytest.raises(ValueError, match="exactly two models"):
        run("nuslerp", [T([1.0]), T([2.0])], base_index=0, per_model=[{}, {"weight": 1.0}])


# --- Multi-SLERP -----------------------------------------------------------------------------------


def tangent_space_multislerp(
    xs: Sequence[torch.Tensor], weights: Sequence[float], eps: float
) -> torch.Tensor:
    """The barycentric step in the tangent space, written out as mergekit describes it (float64)."""
    flat = torch.stack([x.reshape(-1) for x in xs])
    w = torch.tensor(weights, dtype=F64) / sum(weights)
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean
    step = (tangents * w[:, None]).sum(0)
    length = step.norm() + eps
    out = mean * torch.cos(length) + step * torch.sin(length) / length
    return (out * (norms.squeeze(-1) * w).sum()).reshape(xs[0].shape)


def test_multislerp_by_hand_and_the_tangent_step_is_zero() -> None:
    e = torch.eye(3, dtype=F64)
    xs = [e[0], 2 * e[1], 3 * e[2]]
    out = run("multislerp", xs, per_model=[{"weight": 1.0}] * 3, dtype=F64)
    # mean direction (1, 1, 1)/sqrt(3), mean norm (1 + 2 + 3)/3 = 2
    torch.testing.assert_close(out, 2 * torch.ones(3, dtype=F64) / math.sqrt(3))
    g = [randn(4, 5, seed=s, dtype=F64) for s in range(3)]
    weights = [0.5, 0.3, 0.2]
    ours = run("multislerp", g, per_model=[{"weight": w} for w in weights], dtype=F64)
    torch.testing.assert_close(ours, tangent_space_multislerp(g, weights, 1e-8), rtol=1e-12, atol=1e-12)


def test_multislerp_two_models_equal_weights_is_the_slerp_midpoint() -> None:
    a, b = randn(40, seed=5, dtype=F64), randn(40, seed=6, dtype=F64)
    a, b = a / a.norm(), b / b.norm()
    out = run("multislerp", [a, b], per_model=[{"weight": 1.0}, {"weight": 1.0}], dtype=F64)
    torch.testing.assert_close(out, slerp_tensors(0.5, a, b))


def test_multislerp_is_symmetric_and_one_model_is_itself() -> None:
    xs = [randn(3, 4, seed=s) for s in (7, 8, 9)]
    ones = [{"weight": 1.0}] * 3
    torch.testing.assert_close(
        run("multislerp", xs, per_model=ones), run("multislerp", xs[::-1], per_model=ones)
    )
    base = randn(3, 4, seed=10)
    assert torch.equal(run("multislerp", [base, xs[0]], base_index=0, per_model=[{}, {"weight": 0.3}]), xs[0])


def test_multislerp_with_base_and_degenerate_cases() -> None:
    base = T([1.0, 1.0])
    out = run(
        "multislerp",
        [base, base + T([1.0, 0.0]), base + T([0.0, 1.0])],
        base_index=0,
        per_model=[{}, {"weight": 1.0}, {"weight": 1.0}],
        dtype=F64,
    )
    torch.testing.assert_close(out, base + T([R, R]))
    a = T([1.0, 2.0])
    # antipodal pair with equal weights: no direction, linear fallback (0.5 a - 0.5 a)
    both = run("multislerp", [a, -a], per_model=[{"weight": 1.0}, {"weight": 1.0}], dtype=F64)
    assert both.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="cancel out"):
        run("multislerp", [a, -a, a, -a], per_model=[{"weight": 1.0}] * 4, dtype=F64)
    with pytest.raises(ValueError, match="sum to 0"):
        run("multislerp", [a, 2 * a], per_model=[{"weight": 1.0}, {"weight": -1.0}])
    # three fine-tunes that left a tensor equal to the base (a norm weight, say): the base
    untouched = run(
        "multislerp", [base, base, base, base], base_index=0, per_model=[{}] + [{"weight": 1.0}] * 3
    )
    assert torch.equal(untouched, base)


# --- Karcher ---------------------------------------------------------------------------------------


def test_karcher_of_one_model_is_that_model() -> None:
    x = randn(3, 4, seed=11)
    assert torch.equal(run("karcher", [x]), x)


def test_karcher_of_two_is_the_geodesic_midpoint() -> None:
    a, b = randn(50, seed=12, dtype=F64), randn(50, seed=13, dtype=F64)
    b = b * (a.norm() / b.norm())  # equal norms: the Karcher mean is SLERP at t = 1/2
    torch.testing.assert_close(run("karcher", [a, b], dtype=F64), slerp_tensors(0.5, a, b))
    c = 3 * b  # other norm: same direction, the mean norm
    out = run("karcher", [a, c], dtype=F64)
    mid = slerp_tensors(0.5, a / a.norm(), c / c.norm())
    torch.testing.assert_close(out, mid / mid.norm() * (a.norm() + c.norm()) / 2)


def test_karcher_by_hand_and_its_fixed_point_condition() -> None:
    e = torch.eye(3, dtype=F64)
    out = run("karcher", [e[0], e[1], e[2]], dtype=F64)
    torch.testing.assert_close(out, torch.ones(3, dtype=F64) / math.sqrt(3))
    xs = [T([1.0, 0.2, 0.0]), T([0.1, 1.0, 0.3]), T([0.0, 0.5, 2.0]), T([0.7, 0.0, 0.7])]
    out = run("karcher", xs, params={"max_iter": 100, "tol": 1e-12}, dtype=F64)
    m = out / out.norm()
    logs = torch.zeros(3, dtype=F64)  # the Karcher mean is where the mean log map vanishes
    for x in xs:
        u = x / x.norm()
        theta = torch.acos((u @ m).clamp(-1, 1))
        logs += theta / torch.sin(theta) * (u - torch.cos(theta) * m)
    assert logs.norm().item() < 1e-10
    assert out.norm().item() == pytest.approx(sum(x.norm().item() for x in xs) / len(xs))


def test_karcher_zero_inputs() -> None:
    z = torch.zeros(4)
    assert torch.equal(run("karcher", [z, z]), z)
    x = T([3.0, 4.0, 0.0, 0.0], F32)
    # a zero input takes no part in the direction but counts in the mean norm
    torch.testing.assert_close(run("karcher", [x, z]), x / 2)


# --- Model Stock -----------------------------------------------------------------------------------


def test_model_stock_of_identical_finetunes_returns_them() -> None:
    base, ft = randn(8, 6, seed=14), randn(8, 6, seed=15)
    for filter_wise in (False, True):
        out = run("model_stock", [base, ft, ft, ft], base_index=0, params={"filter_wise": filter_wise})
        torch.testing.assert_close(out, ft)


def test_model_stock_by_hand() -> None:
    base = T([1.0, 1.0])
    d1, d2 = T([1.0, 0.0]), T([1.0, 1.0])
    out = run("model_stock", [base, base + d1, base + d2], base_index=0, dtype=F64)
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(out, base + t * (d1 + d2) / 2)
    orthogonal = run("model_stock", [base, base + d1, base + T([0.0, 5.0])], base_index=0, dtype=F64)
    torch.testing.assert_close(orthogonal, base)  # cos 0: t = 0
    opposite = run("model_stock", [base, base + d1, base - d1], base_index=0, dtype=F64)
    torch.testing.assert_close(opposite, base)  # 1 + (N - 1) cos = 0: singular, keep the base


def test_model_stock_filter_wise_is_per_row() -> None:
    base = torch.zeros(2, 2, dtype=F64)
    f1 = T([[1.0, 0.0], [1.0, 0.0]])
    f2 = T([[0.0, 1.0], [2.0, 0.0]])
    out = run("model_stock", [base, f1, f2], base_index=0, params={"filter_wise": True}, dtype=F64)
    # row 0 orthogonal (t = 0), row 1 colinear (t = 1: the average)
    torch.testing.assert_close(out, T([[0.0, 0.0], [1.5, 0.0]]))


def test_model_stock_does_not_depend_on_the_scale_of_the_task_vectors() -> None:
    """mergekit clamps |a||b| at 1e-6, so deltas of ~1e-4 (a real fine-tune) look orthogonal."""
    base = randn(64, seed=16, dtype=F64)
    d1, d2 = randn(64, seed=17, dtype=F64), randn(64, seed=18, dtype=F64)
    d2 = d2 + d1  # correlated
    big = run("model_stock", [base, base + d1, base + d2], base_index=0, dtype=F64) - base
    s = 1e-4
    small = run("model_stock", [base, base + s * d1, base + s * d2], base_index=0, dtype=F64) - base
    torch.testing.assert_close(small, s * big, rtol=1e-6, atol=1e-12)


# --- Breadcrumbs -----------------------------------------------------------------------------------


def test_magnitude_outliers_by_hand() -> None:
    x = T([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 6.0, 8.0])
    # drop the top 2 (10, 9), keep the next 5 (8, 7, 6, 5, 4), drop the rest
    kept = magnitude_outliers(x, 0.5, 0.2, rescale=False)
    assert kept.tolist() == [0.0, 0.0, 0.0, 7.0, -5.0, 0.0, 0.0, -4.0, 6.0, 8.0]
    # density + gamma > 1: fewer outliers are dropped so that 9 survive
    assert magnitude_outliers(x, 0.9, 0.2, rescale=False).tolist() == [3, 0, 1, 7, -5, 2, 9, -4, 6, 8]
    assert int((magnitude_outliers(x, 0.01, 0.0, rescale=False) != 0).sum()) == 1  # at least one
    rescaled = magnitude_outliers(x, 0.5, 0.2, rescale=True)
    assert rescaled.abs().sum().item() == pytest.approx(x.abs().sum().item())


def test_breadcrumbs_with_gamma_zero_is_the_magnitude_trim() -> None:
    x = randn(1000, seed=19)
    for density in (0.1, 0.5, 0.9):
        for rescale in (False, True):
            assert torch.equal(magnitude_outliers(x, density, 0.0, rescale), magnitude(x, density, rescale))


def test_breadcrumbs_merges_by_hand() -> None:
    base = torch.zeros(10, dtype=F64)
    m1 = T([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 6.0, 8.0])
    m2 = -m1.flip(0)
    per = [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.2}, {"weight": 0.5, "density": 0.5, "gamma": 0.2}]
    trimmed1 = magnitude_outliers(m1, 0.5, 0.2, rescale=False)
    trimmed2 = magnitude_outliers(m2, 0.5, 0.2, rescale=False)
    out = run("breadcrumbs", [base, m1, m2], base_index=0, per_model=per, dtype=F64)
    torch.testing.assert_close(out, trimmed1 + 0.5 * trimmed2)
    ties = run("breadcrumbs_ties", [base, m1, m2], base_index=0, per_model=per, dtype=F64)
    weighted = torch.stack([trimmed1, 0.5 * trimmed2])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == sign
    torch.testing.assert_close(ties, (weighted * agree).sum(0))  # normalize is off by default


def test_breadcrumbs_at_density_one_is_task_arithmetic() -> None:
    base, a, b = (randn(30, seed=s) for s in (20, 21, 22))
    per = [{}, {"weight": 0.7, "gamma": 0.3}, {"weight": -0.2, "gamma": 0.3}]
    ta = run("task_arithmetic", [base, a, b], base_index=0, per_model=[{}, {"weight": 0.7}, {"weight": -0.2}])
    assert torch.equal(run("breadcrumbs", [base, a, b], base_index=0, per_model=per), ta)


# --- DELLA -----------------------------------------------------------------------------------------


def test_della_with_epsilon_zero_is_dare_bit_for_bit() -> None:
    delta = randn(64, 48, seed=23)
    for density in (0.2, 0.7):
        for rescale in (False, True):
            dare = bernoulli(delta, density, rescale, seed=99)
            assert torch.equal(della_magprune(delta, density, 0.0, rescale, seed=99), dare)
    base, ft = randn(200, seed=24), randn(200, seed=25)
    per = [{}, {"weight": 0.8, "density": 0.4, "epsilon": 0.0}]
    della = run("della_linear", [base, ft], base_index=0, per_model=per)
    dare = run("dare_linear", [base, ft], base_index=0, per_model=[{}, {"weight": 0.8, "density": 0.4}])
    assert torch.equal(della, dare)


def test_della_keeps_large_entries_more_often() -> None:
    delta = randn(200, 500, seed=26)
    density, epsilon = 0.5, 0.3
    kept = della_magprune(delta, density, epsilon, rescale=False, seed=5) != 0
    assert abs(kept.float().mean().item() - density) < 0.01
    rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / 499  # 0 smallest, 1 largest per row
    for low, high in ((0.0, 0.1), (0.45, 0.55), (0.9, 1.0)):
        in_bin = (rank >= low) & (rank <= high)
        expected = density - epsilon + 2 * epsilon * (low + high) / 2
        assert kept[in_bin].float().mean().item() == pytest.approx(expected, abs=0.02)


def test_della_seeds_give_identical_bytes() -> None:
    base, a, b = (randn(16, 16, seed=s) for s in (27, 28, 29))
    per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}]
    first = run("della", [base, a, b], base_index=0, per_model=per, seeds=[1, 2, 3])
    again = run("della", [base, a, b], base_index=0, per_model=per, seeds=[1, 2, 3])
    other = run("della", [base, a, b], base_index=0, per_model=per, seeds=[1, 2, 4])
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, other)
    # the order inputs come in does not matter, only which seed goes with which model
    swapped = run("della", [base, b, a], base_index=0, per_model=[per[0], per[2], per[1]], seeds=[1, 3, 2])
    torch.testing.assert_close(swapped, first)


def test_della_rows_of_one_entry_and_1d_tensors() -> None:
    column = randn(300, 1, seed=30)  # mergekit divides by max rank - min rank = 0 here
    kept = della_magprune(column, 0.5, 0.2, rescale=False, seed=1)
    assert torch.isfinite(kept).all()
    assert 0.35 < (kept != 0).float().mean().item() < 0.65
    vector = randn(1000, seed=31)
    assert torch.isfinite(della_magprune(vector, 0.3, 0.1, rescale=True, seed=1)).all()


def test_della_refuses_probabilities_outside_zero_one() -> None:
    base, ft = torch.zeros(4), torch.ones(4)
    for density, epsilon in ((0.9, 0.15), (0.1, 0.2), (0.5, -0.6)):
        with pytest.raises(ValueError, match="density ± epsilon"):
            run(
                "della",
                [base, ft],
                base_index=0,
                per_model=[{}, {"weight": 1.0, "density": density, "epsilon": epsilon}],
            )


def test_della_at_density_one_is_ties_or_task_arithmetic() -> None:
    base, a, b = (randn(50, seed=s) for s in (32, 33, 34))
    per = [{}, {"weight": 0.6}, {"weight": 0.3}]
    assert torch.equal(
        run("della", [base, a, b], base_index=0, per_model=per),
        run("ties", [base, a, b], base_index=0, per_model=per),
    )
    assert torch.equal(
        run("della_linear", [base, a, b], base_index=0, per_model=per),
        run("task_arithmetic", [base, a, b], base_index=0, per_model=per),
    )


# --- SCE -------------------------------------------------------------------------------------------


def test_sce_by_hand() -> None:
    base = T([1.0, 1.0, 1.0, 1.0])
    d1, d2 = T([1.0, -1.0, 2.0, 0.0]), T([3.0, 1.0, -4.0, 0.0])
    out = run("sce", [base, base + d1, base + d2], base_index=0, dtype=F64)
    w1, w2 = (1 + 1 + 4) / 4, (9 + 1 + 16) / 4  # mean squares
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # signs elected from d1 + d2 = [4, 0, -2, 0]: +, +, -, +
    expected = T([(w1 * 1 + w2 * 3) / (w1 + w2), 1.0, -4.0, 0.0])  # index 1: only d2 agrees
    torch.testing.assert_close(out, base + expected)


def test_sce_selects_by_variance() -> None:
    base = torch.zeros(4, dtype=F64)
    d1, d2 = T([1.0, 1.0, 0.0, 5.0]), T([1.0, 3.0, 2.0, -5.0])
    # variances: [0, 1, 1, 25]; three are nonzero, int(3 * 0.7) = 2: entries 3 and 1 (1 before 2)
    out = run("sce", [base, d1, d2], base_index=0, params={"select_topk": 0.7}, dtype=F64)
    s1, s2 = T([0.0, 1.0, 0.0, 5.0]), T([0.0, 3.0, 0.0, -5.0])
    w1, w2 = s1.square().mean(), s2.square().mean()
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # votes [0, 4, 0, 0] -> all +; index 3: only d1 agrees
    torch.testing.assert_close(out, T([0.0, (w1 * 1 + w2 * 3) / (w1 + w2), 0.0, 5.0]))


def test_sce_of_one_model() -> None:
    base, ft = randn(20, seed=35), randn(20, seed=36)
    torch.testing.assert_close(run("sce", [base, ft], base_index=0), ft)
    # nothing varies across one model, so a selection keeps nothing
    assert torch.equal(run("sce", [base, ft], base_index=0, params={"select_topk": 0.5}), base)


def test_sce_weights_do_not_depend_on_the_scale_of_the_task_vectors() -> None:
    """mergekit uses equal weights once the mean squares sum below 1e-6, i.e. on real fine-tunes."""
    base = randn(64, seed=37, dtype=F64)
    d1, d2 = randn(64, seed=38, dtype=F64), 3 * randn(64, seed=39, dtype=F64)
    big = run("sce", [base, base + d1, base + d2], base_index=0, dtype=F64) - base
    s = 1e-4
    small = run("sce", [base, base + s * d1, base + s * d2], base_index=0, dtype=F64) - base
    torch.testing.assert_close(small, s * big, rtol=1e-6, atol=1e-14)


# --- NearSwap --------------------------------------------------------------------------------------


def test_nearswap_by_hand() -> None:
    a, b = T([0.0, 0.0, 0.0, 1.0]), T([0.1, 1.0, -2.0, 1.0])
    out = run("nearswap", [a, b], base_index=0, params={"t": 0.5}, dtype=F64)
    torch.testing.assert_close(out, T([0.1, 0.5, -0.5, 1.0]))  # swapped within t, else moved by t


def test_nearswap_limits() -> None:
    a, b = randn(100, seed=40), randn(100, seed=41)
    assert torch.equal(run("nearswap", [a, b], base_index=0, params={"t": 0.0}), a)
    torch.testing.assert_close(run("nearswap", [a, b], base_index=0, params={"t": 1e-9}), a)
    torch.testing.assert_close(run("nearswap", [a, b], base_index=0, params={"t": 100.0}), b)
    # the base decides which end t = 0 is
    assert torch.equal(run("nearswap", [b, a], base_index=1, params={"t": 0.0}), a)


def test_nearswap_tiny_t_swaps_tiny_differences() -> None:
    """mergekit divides by max(|a - b|, 1e-6): for t < 1e-6 a difference of 5e-9 moved only t/1e-6."""
    a, b = T([1.0, 1.0]), T([1.0 + 5e-9, 1.0 + 4e-8])
    out = run("nearswap", [a, b], base_index=0, params={"t": 1e-8}, dtype=F64)
    torch.testing.assert_close(out, T([1.0 + 5e-9, 1.0 + 1e-8]), rtol=0, atol=1e-15)


# --- Arcee Fusion ----------------------------------------------------------------------------------


def test_order_statistics_are_the_lower_sample() -> None:
    x = randn(101, seed=42)
    for q in (0.25, 0.5, 0.75):
        assert order_statistic(x, q).item() == torch.quantile(x, q, interpolation="lower").item()
    y = torch.arange(10.0)
    assert [order_statistic(y, q).item() for q in (0.25, 0.5, 0.75)] == [2.0, 4.0, 6.0]  # floor(q * 9)


def test_arcee_fusion_by_hand() -> None:
    a = torch.zeros(10, dtype=F64)
    diff = T([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 5.0])
    b = a + diff
    out = run("arcee_fusion", [a, b], base_index=0, dtype=F64)
    # 1-D: one KL for the whole vector, so importance ranks like |diff|; sorted, floor(q * 9)
    # gives Q1 = 0.3, median = 0.5, Q3 = 0.7: fence 0.5 + 1.5 * 0.4 = 1.1 (times the KL)
    assert out.tolist() == [0.0] * 9 + [5.0]


def test_arcee_fusion_kl_is_per_row() -> None:
    a = torch.zeros(4, 8, dtype=F64)
    b = a + 0.05 * randn(4, 8, seed=46, dtype=F64)
    b[0, 0] = 0.8  # one large change: row 0's distribution moves a lot, so it is taken
    b[1, :] = 0.3  # larger changes, but a constant shift: softmax unchanged, KL = 0, never taken
    out = run("arcee_fusion", [a, b], base_index=0, dtype=F64)
    assert out[1].abs().sum().item() == 0.0
    assert out[0, 0].item() == 0.8
    kept = out != 0
    assert 0 < int(kept.sum()) < 8  # only outliers of the importance


def test_arcee_fusion_of_equal_models_is_the_base() -> None:
    a = randn(6, 6, seed=43)
    assert torch.equal(run("arcee_fusion", [a, a.clone()], base_index=0), a)


# --- RAM -------------------------------------------------------------------------------------------


def test_ram_by_hand() -> None:
    base = T([1.0, 1.0, 1.0, 1.0])
    d1, d2 = T([1.0, 0.0, 2.0, 0.0]), T([0.0, 0.0, 4.0, 3.0])
    models = [base, base + d1, base + d2]
    out = run("ram", models, base_index=0, dtype=F64)
    torch.testing.assert_close(out, base + T([1.0, 0.0, 3.0, 3.0]))  # unique whole, shared averaged
    plus = run("ramplus_tl", models, base_index=0, params={"r": 0.5, "alpha": 0.6}, dtype=F64)
    # each model: 1 shared, 1 unique -> rho 1, clamped to 0.6 -> lambda 1.3 on its unique entry
    torch.testing.assert_close(plus, base + T([1.3, 0.0, 3.0, 3.9]))


def test_ram_epsilon_decides_what_counts_as_changed() -> None:
    base = torch.zeros(3, dtype=F64)
    d1, d2 = T([1e-6, 0.5, 0.5]), T([0.2, 1e-6, 0.3])
    out = run("ram", [base, d1, d2], base_index=0, params={"epsilon": 1e-5}, dtype=F64)
    torch.testing.assert_close(out, T([0.2, 0.5, 0.4]))  # below epsilon: not a change, dropped


def test_ramplus_with_epsilon_zero_and_an_unchanged_model_has_no_nan() -> None:
    """mergekit computes rho = 0 / max(0, epsilon) = NaN here, and the NaN fills the tensor."""
    base, ft = randn(10, seed=44), randn(10, seed=45)
    out = run("ramplus_tl", [base, ft, base.clone()], base_index=0, params={"epsilon": 0.0})
    torch.testing.assert_close(out, ft)
