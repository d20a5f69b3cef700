"""The merge's anatomy (engine.anatomy): its numbers against a float64 computation, and that it only observes."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import Family

from engine import MergeOptions, load_recipe, run_merge
from engine.anatomy import PLOT_NAME, REPORT_NAME, SCHEMA
from engine.cli import main as cli_main

ROW_KEYS = {"layer", "tensors", "elements", "shares", "sign_conflict", "dropped", "cosines"}
REPORT_KEYS = {"schema", "method", "base_model", "parents", "kind", "dropped_kind", "layers", "totals"}


def weights_of(model: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model.glob("*.safetensors")):
        tensors.update({k: v.to(torch.float64) for k, v in load_file(path).items()})
    return tensors


def group_of(name: str) -> str:
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return match[1]
    if "embed" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "head"
    return "other"


class Sums:
    """Per-group float64 reference sums, independent of the engine's code."""

    def __init__(self) -> None:
        self.contrib: dict[str, dict[str, float]] = {}
        self.pairs: dict[str, dict[tuple[str, str], list[float]]] = {}
        self.conflict: dict[str, list[int]] = {}
        self.dropped: dict[str, list[int]] = {}

    def add(self, group: str, changes: dict[str, torch.Tensor], scales: dict[str, float]) -> None:
        contrib = self.contrib.setdefault(group, {})
        for name, change in changes.items():
            contrib[name] = contrib.get(name, 0.0) + (scales[name] * float(change.norm())) ** 2
        names = list(changes)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                sums = self.pairs.setdefault(group, {}).setdefault((a, b), [0.0, 0.0, 0.0])
                sums[0] += float((changes[a] * changes[b]).sum())
                sums[1] += float((changes[a] ** 2).sum())
                sums[2] += float((changes[b] ** 2).sum())

    def add_signs(self, group: str, deltas: list[torch.Tensor]) -> None:
        stacked = torch.stack([d.reshape(-1) for d in deltas])
        positive, negative = (stacked > 0).any(0), (stacked < 0).any(0)
        counts = self.conflict.setdefault(group, [0, 0])
        counts[0] += int((positive & negative).sum())
        counts[1] += int((positive | negative).sum())

    def check(self, report: dict, parents: list[str]) -> None:
        rows = {row["layer"]: row for row in report["layers"]}
        assert set(rows) == set(self.contrib)
        for group, contrib in self.contrib.items():
            row = rows[group]
            norms = {p: math.sqrt(contrib[p]) for p in parents}
            total = sum(norms.values())
            for p in parents:
                assert row["shares"][p] == pytest.approx(norms[p] / total, rel=1e-4, abs=1e-7), (group, p)
            cosines = {tuple(c["parents"]): c["cosine"] for c in row["cosines"]}
            for (a, b), (dot, sa, sb) in self.pairs[group].items():
                assert cosines[(a, b)] == pytest.approx(dot / math.sqrt(sa * sb), rel=1e-4, abs=1e-6), group
            if group in self.conflict:
                conflicts, nonzero = self.conflict[group]
                assert row["sign_conflict"] == pytest.approx(conflicts / nonzero, abs=1e-12), group
            if group in self.dropped:
                dropped, entries = self.dropped[group]
                assert row["dropped"] == pytest.approx(dropped / entries, abs=1e-12), group


def merged_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    }


def merge_with_report(recipe: str, tmp_path: Path) -> dict:
    plain, observed = tmp_path / "plain", tmp_path / "observed"
    run_merge(load_recipe(recipe), plain)
    run_merge(load_recipe(recipe), observed, options=MergeOptions(report=True))
    assert merged_digest(plain) == merged_digest(observed)  # anatomy observes, never changes
    assert not (plain / REPORT_NAME).exists()
    report: dict = json.loads((observed / REPORT_NAME).read_text())
    check_schema(report)
    return report


def check_schema(report: dict) -> None:
    assert set(report) == REPORT_KEYS
    assert report["schema"] == SCHEMA
    for row in [*report["layers"], report["totals"]]:
        assert set(row) == ROW_KEYS
        assert set(row["shares"]) == set(report["parents"])
        assert sum(row["shares"].values()) == pytest.approx(1.0)
        n = len(report["parents"])
        assert len(row["cosines"]) == n * (n - 1) // 2
    assert report["totals"]["layer"] == "all"
    assert report["totals"]["tensors"] == sum(row["tensors"] for row in report["layers"])


def test_linear_shares_are_weight_times_distance_from_the_merge(llama_family: Family, tmp_path: Path) -> None:
    models = [llama_family.base, *llama_family.finetunes[:2]]
    weights = [0.5, 0.3, 0.2]
    recipe = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(models, weights, strict=True)
    )
    report = merge_with_report(recipe, tmp_path)
    parents = [str(m) for m in models]
    assert report["parents"] == parents and report["kind"] == "distance" and report["base_model"] is None
    tensors = [weights_of(m) for m in models]
    sums = Sums()
    for name in tensors[0]:
        merged = sum(w * t[name] for w, t in zip(weights, tensors, strict=True))
        assert isinstance(merged, torch.Tensor)
        changes = {p: t[name] - merged for p, t in zip(parents, tensors, strict=True)}
        sums.add(group_of(name), changes, dict(zip(parents, weights, strict=True)))
    sums.check(report, parents)
    assert all(row["sign_conflict"] is None and row["dropped"] is None for row in report["layers"])
    assert [row["layer"] for row in report["layers"]] == ["embeddings", "0", "1", "2", "3", "head", "other"]


def task_vector_reference(
    family: Family, weights: list[float], densities: list[float] | None
) -> tuple[Sums, list[str]]:
    base = weights_of(family.base)
    parents = [str(m) for m in family.finetunes[: len(weights)]]
    tuned = [weights_of(m) for m in family.finetunes[: len(weights)]]
    sums = Sums()
    for name in base:
        group = group_of(name)
        deltas = [t[name] - base[name] for t in tuned]
        sums.add(group, dict(zip(parents, deltas, strict=True)), dict(zip(parents, weights, strict=True)))
        sums.add_signs(group, deltas)
        if densities is not None:
            counts = sums.dropped.setdefault(group, [0, 0])
            for delta, density in zip(deltas, densities, strict=True):
                flat = delta.abs().reshape(-1)
                k = max(1, int(density * flat.numel()))
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[torch.topk(flat, k).indices] = True
                counts[0] += int((~keep).sum())
                counts[1] += flat.numel()
    return sums, parents


def test_task_arithmetic_shares_signs_and_cosines(llama_family: Family, tmp_path: Path) -> None:
    a, b = llama_family.finetunes[:2]
    recipe = (
        f"merge_method: task_arithmetic\nbase_model: {llama_family.base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.3}}\n"
    )
    report = merge_with_report(recipe, tmp_path)
    sums, parents = task_vector_reference(llama_family, [0.7, 0.3], None)
    assert report["parents"] == parents and report["base_model"] == str(llama_family.base)
    assert report["kind"] == "task_vector" and report["dropped_kind"] is None
    sums.check(report, parents)
    conflict = report["totals"]["sign_conflict"]
    assert 0.2 < conflict < 0.8  # independent random deltas disagree about half the time


def test_ties_dropped_share_is_what_the_trim_zeroes(llama_family: Family, tmp_path: Path) -> None:
    a, b = llama_family.finetunes[:2]
    recipe = (
        f"merge_method: ties\nbase_model: {llama_family.base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
    )
    report = merge_with_report(recipe, tmp_path)
    sums, parents = task_vector_reference(llama_family, [1.0, 0.5], [0.5, 0.3])
    assert report["dropped_kind"] == "exact"
    sums.check(report, parents)
    assert report["totals"]["dropped"] == pytest.approx(1 - (0.5 + 0.3) / 2, abs=0.01)


def test_slerp_shares_use_the_methods_own_coefficients(
    distant_pair: Callable[[str], Family], tmp_path: Path
) -> None:
    family = distant_pair("llama")
    base, other = family.base, family.finetunes[0]
    recipe = (
        f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {other}\n"
        "parameters: {t: 0.3}\n"
    )
    out = tmp_path / "out"
    run_merge(load_recipe(recipe), out, options=MergeOptions(report=True))
    report = json.loads((out / REPORT_NAME).read_text())
    check_schema(report)
    parents = [str(base), str(other)]
    assert report["parents"] == parents and report["kind"] == "distance"
    merged, x0, x1 = weights_of(out), weights_of(base), weights_of(other)
    sums = Sums()
    for name in x0:  # the written tensor, rounded to bf16: the distances agree to about 1%
        changes = {parents[0]: x0[name] - merged[name], parents[1]: x1[name] - merged[name]}
        sums.add(group_of(name), changes, {parents[0]: 0.7, parents[1]: 0.3})
    rows = {row["layer"]: row for row in report["layers"]}
    for group, contrib in sums.contrib.items():
        norms = [math.sqrt(contrib[p]) for p in parents]
        assert rows[group]["shares"][parents[1]] == pytest.approx(norms[1] / sum(norms), abs=0.01), group
    assert rows["0"]["shares"][parents[1]] != pytest.approx(0.3, abs=0.01)  # not the weights alone


def test_report_files_and_plot(llama_family: Family, tmp_path: Path) -> None:
    a, b = llama_family.finetunes[:2]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: dare_ties\nbase_model: {llama_family.base}\nrandom_seed: 1\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    out = tmp_path / "out"
    assert cli_main(["merge", str(recipe), str(out), "--report", "--no-progress"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    check_schema(report)
    assert report["dropped_kind"] == "expected"
    assert report["totals"]["dropped"] == pytest.approx(1 - (0.4 + 0.7) / 2)
    png = out / PLOT_NAME
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 10  # something was drawn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_reduction_equals_the_torch_one(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from engine import anatomy, kernels
    from engine.anatomy import _reduce_torch

    monkeypatch.setattr(anatomy, "SLICE", 1000)  # several slices, spread over the pool

    def _reduce_kernels(*args: object) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        with ThreadPoolExecutor(2) as pool:
            return anatomy._reduce_kernels(*args, pool)  # type: ignore[arg-type]

    if not kernels.available():
        pytest.skip("numba is not installed")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3001, generator=generator)
    tensors = [base.to(dtype)] + [
        (base + 0.1 * torch.randn(3001, generator=generator)).to(dtype) for _ in range(3)
    ]
    tensors[1][:100] = tensors[0][:100]  # some entries where a task vector is zero
    for signs in (True, False):
        fused = _reduce_kernels(tensors, 0, [1, 2, 3], signs, not signs)
        torch_path = _reduce_torch(tensors, 0, [1, 2, 3] if signs else [])
        assert torch.allclose(fused[0], torch_path[0], rtol=1e-5)
        if not signs:
            assert torch.allclose(fused[1], torch_path[1], rtol=1e-5)
        assert fused[2:] == torch_path[2:]
    assert fused[2] == 0 and _reduce_kernels(tensors, 0, [1, 2, 3], True, False)[2] > 500
