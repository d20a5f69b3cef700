"""TSV-M, ISO-C and ISO-CTS against float64 references written here from the papers' equations.

The references take the orthonormal factor of a stacked basis as ``X (XᵀX)^(-1/2)`` (an
eigendecomposition), not through an SVD as the engine does, so the two agree only if both
are right. TSV-M: Gargiulo et al., https://arxiv.org/abs/2412.00081. ISO-C / ISO-CTS:
Marczak et al., https://arxiv.org/abs/2502.04959.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import Family

from engine import load_recipe, run_merge
from engine.methods import METHODS, MergeCall
from engine.methods.spectral import common_dims
from engine.vocab import has_vocabulary_axis

F64 = torch.float64


# ---- references (float64, from the papers) -------------------------------------------------


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of a full-column-rank ``x``: ``x (xᵀx)^(-1/2)``."""
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)


def polar_rows(x: torch.Tensor) -> torch.Tensor:
    return polar(x.T).T


def ref_tsv(deltas: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """TSV-M, eqs. of Sec. 4: rank-k truncation per task, whitened stacked bases, Σ kept."""
    t = len(deltas)
    k = min(deltas[0].shape) // t
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    u = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    s = torch.cat([s[:k] for _, s, _ in svds])
    v = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    return alpha * polar(u) @ torch.diag(s) @ polar(v).T


def ref_iso_c(deltas: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """ISO-C: the summed task matrix with every singular value replaced by their mean."""
    total = torch.stack(list(deltas)).sum(0)
    mean_sigma = torch.linalg.matrix_norm(total, ord="nuc") / min(total.shape)
    return alpha * mean_sigma * (polar(total) if total.shape[0] >= total.shape[1] else polar_rows(total))


def ref_iso_cts(deltas: Sequence[torch.Tensor], fraction: float, alpha: float) -> torch.Tensor:
    """ISO-CTS: common top-c subspace of the sum, task-specific directions orthogonal to it, flattened."""
    total = torch.stack(list(deltas)).sum(0)
    r, t = min(total.shape), len(deltas)
    c, per_task = common_dims(r, t, fraction)
    assert c + t * per_task == r
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    projector = torch.eye(total.shape[0], dtype=F64) - u[:, :c] @ u[:, :c].T
    for d in deltas:
        ut, st, vht = torch.linalg.svd(projector @ d, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    sigma = torch.cat(ss).mean()
    return alpha * sigma * polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=1)).T


def ref_wudi(deltas: Sequence[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """WUDI, from the paper's loss: Adam (torch.optim, autograd) on Σ_i ||(t - d_i) d_iᵀ||² / ||d_i||², t0 = Σ_i d_i."""
    tvs = torch.stack(list(deltas))  # [T, m, n]
    norms2 = tvs.flatten(1).norm(dim=1) ** 2  # [T]
    t = torch.nn.Parameter(tvs.sum(0).clone())
    optimizer = torch.optim.Adam([t], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (((t.unsqueeze(0) - tvs) @ tvs.transpose(1, 2)) ** 2 / norms2[:, None, None]).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return t.detach()


def wudi_loss(t: torch.Tensor, deltas: Sequence[torch.Tensor]) -> float:
    return sum(float(torch.linalg.matrix_norm((t - d) @ d.T) ** 2 / d.norm() ** 2) for d in deltas)


def ref_merge(
    method: str, name: str, base: torch.Tensor, models: Sequence[torch.Tensor], params: Mapping[str, float]
) -> torch.Tensor:
    """The whole rule of one tensor: SVD merges for matrices, the mean of task vectors otherwise."""
    deltas = [m.to(F64) - base.to(F64) for m in models]
    alpha = params.get("alpha", 1.0)
    base64 = base.to(F64)
    if method == "wudi":
        alpha = 1.0  # WUDI has no alpha
    if base.dim() != 2 or has_vocabulary_axis(name):
        return base64 + alpha * torch.stack(deltas).mean(0)
    if method == "wudi":
        return base64 + ref_wudi(deltas, int(params.get("steps", 300)), params.get("lr", 1e-5))
    if method == "tsv":
        return base64 + ref_tsv(deltas, alpha)
    if method == "iso_c":
        return base64 + ref_iso_c(deltas, alpha)
    return base64 + ref_iso_cts(deltas, params.get("common_space_fraction", 0.8), alpha)


# ---- helpers ---------------------------------------------------------------------------------


def merge(
    method: str,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    params: Mapping[str, float] | None = None,
    weights: Sequence[float] | None = None,
    name: str = "model.layers.0.mlp.up_proj.weight",
) -> torch.Tensor:
    spec = METHODS[method]
    shared = {p.name: p.default for p in spec.params if p.scope.value == "shared"}
    shared.update(params or {})
    per_model = [{"weight": w} for w in (weights or [1.0] * len(models))]
    return spec.merge(
        MergeCall(
            tensors=[base, *models],
            base_index=0,
            params=shared,  # type: ignore[arg-type]
            input_params=[{}, *per_model],
            seeds=list(range(len(models) + 1)),
            tensor_name=name,
        )
    )


def random_family(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


SHAPES = [(12, 12), (16, 9), (7, 20)]


# ---- each method equals its formula ---------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_equals_the_paper(shape: tuple[int, int], n: int) -> None:
    base, models = random_family(shape, n, seed=n)
    out = merge("tsv", base, models, {"alpha": 0.7})
    expected = base + ref_tsv([m - base for m in models], 0.7)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_equals_the_paper(shape: tuple[int, int]) -> None:
    base, models = random_family(shape, 3, seed=1)
    out = merge("iso_c", base, models, {"alpha": 1.3})
    torch.testing.assert_close(out, base + ref_iso_c([m - base for m in models], 1.3), rtol=1e-9, atol=1e-9)
    spectrum = torch.linalg.svdvals(out - base)
    torch.testing.assert_close(spectrum, spectrum[0].expand_as(spectrum))  # isotropic: one singular value


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("n", "fraction"), [(2, 0.8), (3, 0.8), (3, 0.5), (4, 0.0)])
def test_iso_cts_equals_the_paper(shape: tuple[int, int], n: int, fraction: float) -> None:
    base, models = random_family(shape, n, seed=7)
    out = merge("iso_cts", base, models, {"alpha": 1.5, "common_space_fraction": fraction})
    expected = base + ref_iso_cts([m - base for m in models], fraction, 1.5)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_weights_scale_each_task_vector_before_the_merge() -> None:
    base, models = random_family((10, 8), 2, seed=3)
    for method in ("tsv", "iso_c", "iso_cts"):
        weighted = merge(method, base, models, weights=[0.5, 2.0])
        scaled = [base + 0.5 * (models[0] - base), base + 2.0 * (models[1] - base)]
        torch.testing.assert_close(weighted, merge(method, base, scaled), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(weighted, merge(method, base, models))


@pytest.mark.parametrize("shape", [*SHAPES, (4, 30)])  # (7, 20) with 2 models, (4, 30): summed task by task
@pytest.mark.parametrize("n", [2, 3])
def test_wudi_equals_adam_on_the_paper_loss(shape: tuple[int, int], n: int) -> None:
    base, models = random_family(shape, n, seed=n + 20)
    deltas = [m - base for m in models]
    out = merge("wudi", base, models, {"steps": 40, "lr": 1e-3})
    torch.testing.assert_close(out, base + ref_wudi(deltas, 40, 1e-3), rtol=1e-9, atol=1e-9)
    assert wudi_loss(out - base, deltas) < 0.9 * wudi_loss(sum(deltas), deltas)  # the steps lowered it


def test_wudi_starts_at_the_sum_and_one_model_is_a_fixed_point() -> None:
    base, models = random_family((9, 7), 3, seed=9)
    torch.testing.assert_close(
        merge("wudi", base, models, {"steps": 0}), base + sum(m - base for m in models)
    )
    one = merge("wudi", base, models[:1], {"steps": 25, "lr": 1e-2})
    torch.testing.assert_close(one, models[0])  # loss and gradient are zero at t = d_1


def test_wudi_leaves_a_zero_task_vector_out_of_the_loss() -> None:
    base, models = random_family((6, 10), 2, seed=10)
    with_zero = merge("wudi", base, [*models, base.clone()], {"steps": 30, "lr": 1e-3})
    torch.testing.assert_close(with_zero, merge("wudi", base, models, {"steps": 30, "lr": 1e-3}))
    assert torch.isfinite(with_zero).all()


# ---- invariants -----------------------------------------------------------------------------


def test_tsv_of_one_model_is_its_task_vector() -> None:
    base, models = random_family((9, 6), 1)
    torch.testing.assert_close(merge("tsv", base, models, {"alpha": 2.0}), base + 2.0 * (models[0] - base))


def test_tsv_of_task_vectors_in_orthogonal_subspaces_is_their_sum() -> None:
    """Nothing to decorrelate: low-rank task vectors on disjoint rows and columns add up."""
    base = torch.zeros(8, 8, dtype=F64)
    a, b = torch.zeros(8, 8, dtype=F64), torch.zeros(8, 8, dtype=F64)
    a[:4, :4] = torch.tensor([[3.0, 1.0], [1.0, 2.0]]).repeat(2, 2)[:4, :4] + torch.eye(4, dtype=F64)
    b[4:, 4:] = torch.diag(torch.tensor([5.0, 4.0, 0.5, 0.25], dtype=F64))
    out = merge("tsv", base, [a, b])
    assert torch.linalg.matrix_rank(a) == 4  # k = 8 // 2 = 4: nothing truncated either
    torch.testing.assert_close(out, a + b)


def test_tsv_truncates_each_task_to_rank_dim_over_tasks() -> None:
    base, models = random_family((12, 12), 3, seed=2)
    out = merge("tsv", base, models)
    sigma = torch.linalg.svdvals(out - base)
    assert int((sigma > 1e-9).sum()) == 12  # 3 tasks x rank 4
    one = merge("tsv", base, models[:1])
    assert torch.linalg.matrix_rank(one - base) == 12  # one task: k = 12, the whole task vector


def test_iso_cts_with_the_whole_space_common_is_iso_c() -> None:
    base, models = random_family((10, 14), 3, seed=4)
    torch.testing.assert_close(
        merge("iso_cts", base, models, {"common_space_fraction": 1.0}), merge("iso_c", base, models)
    )


@pytest.mark.parametrize(
    ("r", "count", "fraction", "expected"),
    [
        (10, 3, 0.8, (7, 1)),
        (8, 2, 0.8, (6, 1)),
        (768, 8, 0.8, (616, 19)),
        (5, 3, 0.0, (2, 1)),
        (2, 3, 0.8, (2, 0)),
    ],
)
def test_common_space_split(r: int, count: int, fraction: float, expected: tuple[int, int]) -> None:
    assert common_dims(r, count, fraction) == expected


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.norm.weight", (12,)),
        ("model.layers.0.self_attn.q_proj.bias", (12,)),
        ("model.embed_tokens.weight", (12, 6)),
        ("lm_head.weight", (12, 6)),
    ],
)
def test_tensors_not_decomposed_take_the_mean_task_vector(
    method: str, name: str, shape: tuple[int, ...]
) -> None:
    base, models = random_family(shape, 3, seed=5)
    alpha = 1.0 if method == "wudi" else 0.9  # WUDI has no alpha
    out = merge(method, base, models, {"alpha": alpha} if method != "wudi" else {}, name=name)
    expected = base + alpha * torch.stack([m - base for m in models]).mean(0)
    torch.testing.assert_close(out, expected)


def test_tsv_with_fewer_directions_than_tasks_takes_the_mean() -> None:
    base, models = random_family((2, 6), 3, seed=6)
    expected = base + torch.stack([m - base for m in models]).mean(0)
    torch.testing.assert_close(merge("tsv", base, models), expected)


def test_float32_inputs_stay_close_to_the_float64_formula() -> None:
    base, models = random_family((24, 16), 3, seed=8)
    for method in ("tsv", "iso_c", "iso_cts"):
        out = merge(method, base.float(), [m.float() for m in models])
        assert out.dtype == torch.float32
        expected = ref_merge(method, "model.layers.0.mlp.up_proj.weight", base, models, {})
        torch.testing.assert_close(out.to(F64), expected, rtol=1e-5, atol=1e-5)


# ---- recipes through the engine ---------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


WEIGHTS = (0.5, 1.0, 1.5)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tsv", {"alpha": 0.8}),
        ("iso_c", {"alpha": 1.2}),
        ("iso_cts", {"alpha": 1.5, "common_space_fraction": 0.5}),
        ("wudi", {"steps": 20, "lr": 1e-3}),
    ],
)
def test_recipe_merges_every_tensor_by_the_reference(
    qwen2_family_f32: Family, tmp_path: Path, method: str, params: dict[str, float]
) -> None:
    family = qwen2_family_f32
    settings = ", ".join(f"{k}: {v}" for k, v in params.items())
    recipe = (
        f"merge_method: {method}\nbase_model: {family.base}\nparameters: {{{settings}}}\nmodels:\n"
        + "".join(
            f"  - model: {ft}\n    parameters: {{weight: {w}}}\n"
            for ft, w in zip(family.finetunes, WEIGHTS, strict=True)
        )
    )
    run_merge(load_recipe(recipe), tmp_path / "out")
    merged = _tensors(tmp_path / "out")
    base = _tensors(family.base)
    finetunes = [_tensors(ft) for ft in family.finetunes]
    assert set(merged) == set(base)
    decomposed = 0
    for name, tensor in merged.items():
        assert tensor.shape == base[name].shape and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
        scaled = [
            base[name].to(F64) + w * (ft[name].to(F64) - base[name])
            for ft, w in zip(finetunes, WEIGHTS, strict=True)
        ]
        expected = ref_merge(method, name, base[name], scaled, params)
        torch.testing.assert_close(tensor.to(F64), expected, rtol=1e-5, atol=1e-5)  # float32 SVDs
        decomposed += tensor.dim() == 2 and not has_vocabulary_axis(name)
    assert decomposed >= 7 * 2  # q, k, v, o, gate, up, down in each of the layers


# ---- fusion-bench, the papers' reference code, when it is installed ----------------------------


def test_equals_fusion_bench_when_installed() -> None:
    """The engine against fusion-bench's implementations (not a project dependency: skipped without it)."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts as fb_iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.wudi.wudi import wudi_merging

    name = "model.layers.0.mlp.up_proj.weight"
    for shape in SHAPES:
        base, models = random_family(shape, 3, seed=11)
        tvs = [{name: m - base, "model.norm.weight": (m - base)[0]} for m in models]
        fb = {
            "tsv": compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
            "iso_c": fb_iso_c(tvs, accelerator="cpu"),
            "iso_cts": fb_iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
        }
        with torch.enable_grad():  # fusion-bench's WUDI has a fixed learning rate of 1e-5
            fb["wudi"] = {k: v.detach() for k, v in wudi_merging(tvs, accelerator="cpu", iter_num=30).items()}
        for method, merged in fb.items():
            params = {"steps": 30} if method == "wudi" else None
            torch.testing.assert_close(merge(method, base, models, params, name=name), base + merged[name])
            norm = merge(method, base[0], [m[0] for m in models], name="model.norm.weight")
            torch.testing.assert_close(norm, base[0] + merged["model.norm.weight"])


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_bf16_recipe_gives_the_same_bytes_twice(llama_family: Family, tmp_path: Path, method: str) -> None:
    family = llama_family
    extra = "parameters: {steps: 5, lr: 1.0e-3}\n" if method == "wudi" else ""
    recipe = f"merge_method: {method}\nbase_model: {family.base}\n{extra}models:\n" + "".join(
        f"  - model: {ft}\n    parameters: {{weight: {0.5 + i}}}\n" for i, ft in enumerate(family.finetunes)
    )
    run_merge(load_recipe(recipe), tmp_path / "a")
    run_merge(load_recipe(recipe), tmp_path / "b")
    first, second = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    base = _tensors(family.base)
    assert set(first) == set(base)
    for name, tensor in first.items():
        assert tensor.dtype == torch.bfloat16 and tensor.shape == base[name].shape
        assert torch.isfinite(tensor.float()).all()
        assert torch.equal(tensor.view(torch.int16), second[name].view(torch.int16)), name
    changed = [n for n in first if not torch.equal(first[n], base[n])]
    assert len(changed) > len(first) // 2  # the merge moved the weights away from the base
