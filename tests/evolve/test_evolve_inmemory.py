"""A trial's in-memory merge is byte-equal to run_merge of the recipe it reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import Family

from engine import run_merge
from engine.evolve import InMemoryMerger, ResidentCausalLM, baseline_recipe, build_space, load_search


def written(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_byte_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize(
    ("family_name", "method", "parameters", "extra"),
    [
        # DARE draws a mask per tensor and model: the plan's seeds must be the ones used
        (
            "llama_family",
            "dare_ties",
            {"weight": {"min": 0.1, "max": 1.0, "layer_groups": 2}, "density": {"min": 0.3}},
            {},
        ),
        (
            "qwen2_family",
            "ties",
            {"weight": {"min": 0.1, "max": 1.0}, "density": {"min": 0.3}},
            {"dtype": "float32", "out_dtype": "bfloat16"},
        ),
        (
            "llama_family_f32",
            "task_arithmetic",
            {"weight": {"min": -0.5, "max": 1.0}, "lambda": {"min": 0.5, "max": 1.5}},
            {},
        ),
    ],
)
def test_in_memory_merge_equals_run_merge(
    request: pytest.FixtureRequest,
    write_search: Any,
    tmp_path: Path,
    family_name: str,
    method: str,
    parameters: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    family: Family = request.getfixturevalue(family_name)
    spec = load_search(write_search(family, method=method, parameters=parameters, seed=7, **extra))
    space = build_space(spec)
    merger = InMemoryMerger([spec.base_model, *spec.models])
    gen = torch.Generator().manual_seed(3)
    values = {
        d.key: d.low + (d.high - d.low) * float(torch.rand((), generator=gen)) for d in space.dimensions
    }
    configs = (space.recipe(values), baseline_recipe(spec, "linear"), baseline_recipe(spec, "ties"))
    for index, config in enumerate(configs):
        in_memory = dict(merger.merge(config))
        out = tmp_path / f"out-{index}"
        run_merge(config, out)
        assert_byte_equal(in_memory, written(out))


def test_the_resident_model_holds_exactly_the_merged_tensors(llama_family: Family, write_search: Any) -> None:
    spec = load_search(write_search(llama_family))
    space = build_space(spec)
    merger = InMemoryMerger([spec.base_model, *spec.models])
    config = space.recipe(space.center())
    lm = ResidentCausalLM(spec.base_model, dtype=merger.output_dtype(config))
    before = {k: v.clone() for k, v in lm.state().items()}
    lm.load(merger.merge(config))
    merged = dict(merger.merge(config))
    state = lm.state()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
    assert any(not torch.equal(before[n], merged[n]) for n in merged)  # the trial changed the model
    # a merge is a pure function of the recipe: the same recipe twice gives the same bytes
    assert_byte_equal(merged, dict(merger.merge(config)))
