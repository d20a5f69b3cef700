"""The fused CPU loops give the torch path's bytes, and the radix cut is the exact top-k cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import kernels
from engine.methods import METHODS, task_arithmetic
from engine.methods.base import MergeCall
from engine.methods.sparsify import DRAW_BLOCK, della_magprune, topk_cut, uniform_draws
from engine.methods.task_arithmetic import _kernel_cut, _merge_rows, sparse_merge_by_slices

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is part of the install; see pyproject")


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int16)


def _raw(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that NaNs and signed zeros compare too."""
    return values.view(torch.int16 if values.element_size() == 2 else torch.int32)


def test_bf16_store_rounds_to_nearest_even_like_torch() -> None:
    special = torch.tensor(
        [0.0, -0.0, 1.0, -1.5, 3.0e38, -3.4e38, float("inf"), float("-inf"), 1e-40, -1e-42]
    )
    halfway = (torch.arange(0, 1 << 16, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # exact ties
    values = torch.cat([special, halfway[torch.isfinite(halfway)], torch.randn(100_000) * 1e3])
    out = torch.empty(values.numel(), dtype=torch.bfloat16)
    kernels.weighted_sum(
        (kernels.as_array(values),), 0, values.numel(), np.ones(1, np.float32), kernels.as_array(out)
    )
    assert torch.equal(_bits(out), _bits(values.to(torch.bfloat16)))
    nan = torch.tensor([float("nan")])
    kernels.weighted_sum((kernels.as_array(nan),), 0, 1, np.ones(1, np.float32), kernels.as_array(out[:1]))
    assert torch.isnan(out[0])


def _reference_cut(model: torch.Tensor, base: torch.Tensor, k: int) -> tuple[float, int]:
    magnitudes = (model.float() - base.float()).abs().reshape(-1)
    return topk_cut(magnitudes, k)


CUT_CASES = {
    "n": st.integers(2, 3000),
    "fraction": st.floats(0.0, 1.0),
    "zeros": st.floats(0.0, 0.9),
    "scale": st.sampled_from([1e-3, 1.0, 1e4]),
    "seed": st.integers(0, 2**16),
}


def _cut_case(n: int, zeros: float, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, model) in bf16: a share ``zeros`` of the entries unchanged, the rest moved by ~``scale``."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator).bfloat16()
    delta = torch.randn(n, generator=generator) * scale * 0.01
    delta[torch.rand(n, generator=generator) < zeros] = 0.0  # unchanged entries: ties at zero
    model = (base.float() + delta).bfloat16()  # bf16 steps: many equal magnitudes
    return base, model


def _check_cut(base: torch.Tensor, model: torch.Tensor, fraction: float) -> None:
    n = base.numel()
    k = min(n - 1, max(1, int(fraction * n)))
    cut, _, _ = _kernel_cut(kernels.as_array(model), kernels.as_array(base), n, k, sums=False)
    threshold, last_tie = _reference_cut(model, base, k)
    assert cut.threshold == threshold
    a = (model.float() - base.float()).abs()
    positions = torch.arange(n)
    ours = (a > cut.threshold) | ((a == cut.threshold) & (positions <= cut.last_tie))
    theirs = (a > threshold) | ((a == threshold) & (positions <= last_tie))
    assert torch.equal(ours, theirs)
    assert int(ours.sum()) == k


@settings(max_examples=40, deadline=None)
@given(**CUT_CASES)
def test_radix_cut_is_the_exact_topk_cut(
    n: int, fraction: float, zeros: float, scale: float, seed: int
) -> None:
    _check_cut(*_cut_case(n, zeros, scale, seed), fraction)


@settings(max_examples=60, deadline=None)
@given(**CUT_CASES, guess=st.sampled_from(["sampled", "missed", "wide"]))
def test_the_sampled_cut_is_exact_whether_its_guess_holds_or_not(
    n: int, fraction: float, zeros: float, scale: float, seed: int, guess: str
) -> None:
    # Small tensors, in several slices, take the path of large ones: a window of bins guessed
    # from a sample, counted in the first pass (one bin) or gathered and counted after it
    # (several); when the guess misses, the second pass reads the tensors after all.
    second_reads = []
    real_low = kernels.magnitude_low_histogram

    def counting(*args: object) -> np.ndarray:
        second_reads.append(args)
        return real_low(*args)  # type: ignore[arg-type]

    def around_the_cut(sample: np.ndarray, size: int, k: int) -> tuple[int, int]:
        magnitudes = (model.float() - base.float()).abs()
        threshold, _ = topk_cut(magnitudes, k)
        true_bin = int(np.float32(threshold).view(np.uint32)) >> 16
        return max(0, true_bin - 1), true_bin + 2

    base, model = _cut_case(n, zeros, scale, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task_arithmetic, "SAMPLE_MIN", 0)
        patch.setattr(task_arithmetic, "PASS1_SLICE", 97)
        patch.setattr(task_arithmetic, "SAMPLE_BLOCKS", 8)
        patch.setattr(task_arithmetic, "SAMPLE_BLOCK", 16)
        patch.setattr(kernels, "magnitude_low_histogram", counting)
        if guess == "missed":  # one empty bin far from any cut: the first pass finds another
            patch.setattr(task_arithmetic, "_sampled_window", lambda *args: (0x7F7F, 0x7F7F))
        if guess == "wide":
            patch.setattr(task_arithmetic, "_sampled_window", around_the_cut)
        _check_cut(base, model, fraction)
    if guess == "missed":
        assert second_reads
    if guess == "wide":
        assert not second_reads


def test_a_large_cut_reads_its_tensors_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = (1 << 20) + 12_345  # over SAMPLE_MIN, in two slices
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=generator).bfloat16()
    model = (base.float() + torch.randn(n, generator=generator) * 0.01).bfloat16()
    second_reads = []
    monkeypatch.setattr(kernels, "magnitude_low_histogram", lambda *args: second_reads.append(args))
    for fraction in (0.1, 0.5, 0.9):
        k = int(fraction * n)
        cut, _, _ = _kernel_cut(kernels.as_array(model), kernels.as_array(base), n, k, sums=False)
        assert (cut.threshold, cut.last_tie) == _reference_cut(model, base, k)
    assert not second_reads  # the sample's window held the cut each time


def _call(
    method: str, tensors: list[torch.Tensor], params: dict[str, object], per_model: dict[str, object]
) -> MergeCall:
    spec = METHODS[method]
    shared = {p.name: p.default for p in spec.params if p.scope.value == "shared"}
    shared.update(params)
    return MergeCall(
        tensors=tensors,
        base_index=0,
        params=shared,  # type: ignore[arg-type]
        input_params=[{}, *[dict(per_model, weight=w) for w in (0.6, -0.3, 0.9)][: len(tensors) - 1]],
        seeds=list(range(11, 11 + len(tensors))),
        out_dtype=tensors[0].dtype,
    )


@pytest.mark.parametrize(
    ("method", "params", "per_model"),
    [
        ("ties", {}, {"density": 0.4}),
        ("ties", {"rescale": True, "normalize": False, "lambda": 1.3}, {"density": 0.25}),
        ("dare_ties", {}, {"density": 0.5}),
        ("dare_linear", {"rescale": False}, {"density": 0.7}),
        ("task_arithmetic", {"lambda": 0.8}, {}),
        ("breadcrumbs_ties", {}, {"density": 0.5, "gamma": 0.05}),
        ("breadcrumbs", {"rescale": True}, {"density": 0.3, "gamma": 0.2}),
        ("della", {}, {"density": 0.5, "epsilon": 0.15}),
        ("della", {"rescale": False}, {"density": 0.4, "epsilon": -0.2}),
        ("della_linear", {}, {"density": 0.6, "epsilon": 0.3}),
        ("della_linear", {"lambda": 1.2}, {"density": 0.5, "epsilon": 0.0}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_task_vector_merges_equal_the_torch_path(
    method: str,
    params: dict[str, object],
    per_model: dict[str, object],
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(5)
    shape = (700, 900)  # several slices and a ragged last one
    base = torch.randn(shape, generator=generator)
    tensors = [base.to(dtype)] + [
        (base + torch.randn(shape, generator=generator) * 0.02).to(dtype) for _ in range(3)
    ]
    call = _call(method, tensors, params, per_model)
    sparsifier = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random"}.get(method)
    if method.startswith("breadcrumbs"):
        sparsifier = "magnitude_outliers"
    if method.startswith("della"):
        sparsifier = "della_magprune"
    consensus = "sum" if method in ("ties", "dare_ties", "breadcrumbs_ties", "della") else None
    fused = sparse_merge_by_slices(call, sparsifier, consensus)
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    reference = sparse_merge_by_slices(call, sparsifier, consensus)
    assert fused.dtype == reference.dtype == dtype
    assert torch.equal(_raw(fused), _raw(reference))


def test_linear_kernel_equals_torch_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(9)
    tensors = [torch.randn(300_001, generator=generator).bfloat16() for _ in range(3)]
    call = MergeCall(
        tensors=tensors,
        base_index=None,
        params={"normalize": True},
        input_params=[{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.9}],
        seeds=[0, 1, 2],
        out_dtype=torch.bfloat16,
    )
    fused = METHODS["linear"].merge(call)
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    reference = METHODS["linear"].merge(
        MergeCall(**{**call.__dict__, "tensors": [t.float() for t in tensors]})
    )
    assert torch.equal(_bits(fused), _bits(reference.to(torch.bfloat16)))


def test_kernels_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    assert not kernels.available()
    assert not kernels.fits([torch.zeros(4)], torch.float32)


@pytest.mark.parametrize("start", [0, 1, 895, DRAW_BLOCK - 3, DRAW_BLOCK, 2 * DRAW_BLOCK + 17])
@pytest.mark.parametrize("count", [0, 1, 1000, DRAW_BLOCK + 5])
def test_draws_from_any_position_are_those_of_the_whole_tensor(start: int, count: int) -> None:
    whole = uniform_draws(7, 0, start + count)
    assert torch.equal(uniform_draws(7, start, count), whole[start:])
    assert torch.equal(uniform_draws(7, start, count, out=torch.empty(count)), whole[start:])


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**62 + 7])
def test_fused_draws_equal_the_torch_draws_and_look_uniform(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = [0, 3, 2**31 - 5, 2**40 + 11]  # positions past 32 bits too
    fused = [uniform_draws(seed, start, 50_000) for start in starts]
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    for start, draws in zip(starts, fused, strict=True):
        assert torch.equal(draws, uniform_draws(seed, start, 50_000))
    draws = torch.cat(fused)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    counts = torch.histc(draws, bins=20, min=0.0, max=1.0)
    expected = draws.numel() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 60  # chi-square, 19 dof: p ~ 1e-6
    assert abs(float(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1])) < 0.01
    assert not torch.equal(uniform_draws(seed, 0, 1000), uniform_draws(seed + 1, 0, 1000))


def _della_one_shot(call: MergeCall, consensus: str | None) -> torch.Tensor:
    """The whole-tensor formula: ``della_magprune`` per model, then the vote and the merge."""
    base = call.base.float()
    rows, weights = [], []
    for i in call.others():
        params = call.input_params[i]
        delta = della_magprune(
            call.tensors[i].float() - base,
            float(params["density"]),
            float(params["epsilon"]),
            bool(call.params["rescale"]),
            call.seeds[i],
        )
        rows.append(delta.mul_(float(params["weight"])))
        weights.append(float(params["weight"]))
    totals = torch.stack(rows).sum(dim=0)
    merged = _merge_rows(
        rows, weights, base, totals, consensus, bool(call.params["normalize"]), float(call.params["lambda"])
    )
    return merged.to(call.out_dtype)


@pytest.mark.parametrize(
    "shape", [(37,), (300_001,), (70, 4352), (33, 17), (5, 1), (3, 200_000), (129, 2049)]
)
@pytest.mark.parametrize(
    ("method", "rescale"), [("della", True), ("della_linear", False), ("della_linear", True)]
)
def test_streamed_della_is_the_whole_tensor_formula(
    shape: tuple[int, ...], method: str, rescale: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows streamed in slices (kernels, then torch) give the one-shot MagPrune's bytes, ties included."""
    generator = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    base = torch.randn(shape, generator=generator)
    steps = torch.randint(-3, 4, (3, *shape), generator=generator).float() * 0.01  # many equal magnitudes
    tensors = [base.bfloat16()] + [(base + steps[m]).bfloat16() for m in range(3)]
    call = _call(method, tensors, {"rescale": rescale}, {"density": 0.45, "epsilon": 0.2})
    consensus = "sum" if method == "della" else None
    expected = _della_one_shot(call, consensus)
    fused = sparse_merge_by_slices(call, "della_magprune", consensus)
    assert torch.equal(_raw(fused), _raw(expected))
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    assert torch.equal(_raw(sparse_merge_by_slices(call, "della_magprune", consensus)), _raw(expected))


def test_della_streams_and_takes_stored_inputs_of_any_shape() -> None:
    """della reads zero-copy views; a 3-D tensor (rows along dim 1, not contiguous) is widened whole."""
    assert METHODS["della"].streams and METHODS["della_linear"].streams
    generator = torch.Generator().manual_seed(3)
    for shape in [(4, 6, 5), (40, 33)]:
        base = torch.randn(shape, generator=generator)
        tensors = [base.bfloat16()] + [
            (base + torch.randn(shape, generator=generator) * 0.02).bfloat16() for _ in range(3)
        ]
        call = _call("della", tensors, {}, {"density": 0.5, "epsilon": 0.1})
        expected = _della_one_shot(call, "sum")
        assert torch.equal(_raw(METHODS["della"].merge(call).to(torch.bfloat16)), _raw(expected))


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_norm_based_kernels_agree_with_torch_to_the_last_bf16_digit(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # their norms and dot products are summed in float64 by the kernels, in float32 by torch:
    # the coefficients may differ in their last digits, the outputs by at most one bf16 step
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(600, 700, generator=generator)
    tensors = [base.bfloat16()] + [
        (base + torch.randn(base.shape, generator=generator) * 0.05).bfloat16() for _ in range(3)
    ]
    if method == "slerp":
        tensors = tensors[:2]
    spec = METHODS[method]
    call = MergeCall(
        tensors=tensors,
        base_index=0,
        params={"t": 0.3} if method == "slerp" else {"filter_wise": False},
        input_params=[{} for _ in tensors],
        seeds=[0] * len(tensors),
        out_dtype=torch.bfloat16,
    )
    fused = spec.merge(call)
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")
    reference = spec.merge(MergeCall(**{**call.__dict__, "tensors": [t.float() for t in tensors]})).to(
        torch.bfloat16
    )
    gap = (fused.float() - reference.float()).abs()
    one_step = torch.maximum(fused.float().abs(), reference.float().abs()) * 2.0**-7  # >= one bf16 step
    assert bool((gap <= one_step.clamp_min(1e-4)).all())  # (near-cancelling sums: absolute, inputs ~1)
    assert float((gap == 0).float().mean()) > 0.99
