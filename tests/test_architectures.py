"""The architecture zoo: every family merged with linear, TIES and a passthrough stack, checked three ways.

For each architecture of ``tests/zoo.py`` (base + two fine-tunes, float32): the output's tensors
equal a float64 computation of the recipe written here from the inputs alone; the output passes
the engine's verification (``verify=True``: transformers builds it on the meta device and expects
exactly its tensors); and transformers loads it for real, with no missing or unexpected keys and the
written values. The passthrough stacks the language model's layers 0, 1, 1 and must leave the vision
tower whole (one model's, all its layers), whatever the depth of either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import zoo
from oracle import load_tensors, read_json

from engine import MergeOptions, run_merge
from engine.config import validate_recipe

METHODS = ("linear", "ties", "passthrough")
LINEAR_WEIGHTS = (0.2, 0.3, 0.5)  # base, ft0, ft1
TIES_WEIGHTS, TIES_DENSITY = (1.0, 0.5), 0.5  # ft0, ft1
# output layer -> (model index among base, ft0, ft1; its layer): ft0 layers 0-1, then ft1 layer 1
STACKED = ((1, 0), (1, 1), (2, 1))

Family = tuple[Path, ...]


@pytest.fixture(scope="module")
def zoo_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[zoo.Arch], Family]:
    """Build (once per architecture) a base and two fine-tunes."""
    cache: dict[str, Family] = {}

    def make(arch: zoo.Arch) -> Family:
        if arch.name not in cache:
            cache[arch.name] = zoo.build_family(arch, tmp_path_factory.mktemp(f"zoo-{arch.name}"))
        return cache[arch.name]

    return make


def recipe(method: str, models: Family) -> dict[str, Any]:
    base, ft0, ft1 = (str(p) for p in models)
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip((base, ft0, ft1), LINEAR_WEIGHTS, strict=True)
            ],
        }
    if method == "ties":
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w, "density": TIES_DENSITY}}
                for m, w in zip((ft0, ft1), TIES_WEIGHTS, strict=True)
            ],
        }
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": ft0, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft1, "layer_range": [1, 2]}]},
        ],
    }


def ties64(base: torch.Tensor, finetunes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES in float64 (trim to the top ``density`` by magnitude, elect signs by sum, disjoint mean).

    Returns the result and a mask of positions where float32 rounding may validly decide otherwise
    (a magnitude at the trim cut, a sign sum near zero).
    """
    ambiguous = torch.zeros(base.shape, dtype=torch.bool)
    weighted = []
    for x, w in zip(finetunes, TIES_WEIGHTS, strict=True):
        delta = x - base
        k = max(1, int(TIES_DENSITY * delta.numel()))
        largest = delta.abs().flatten().topk(min(k + 1, delta.numel())).values
        cut, below = largest[k - 1], largest[-1]
        if k < delta.numel() and cut - below <= 1e-5 * cut:  # the k-th and next magnitudes all but tie
            ambiguous |= (delta.abs() >= below) & (delta.abs() <= cut)
        weighted.append(w * delta * (delta.abs() >= cut))
    stacked = torch.stack(weighted)
    total = stacked.sum(0)
    scale = stacked.abs().sum(0)
    ambiguous |= (total.abs() <= 1e-6 * scale) & (scale > 0)  # nothing kept anywhere: surely the base
    elected = torch.where(total >= 0, 1.0, -1.0).double()
    agree = stacked.sign() == elected
    weights = torch.tensor(TIES_WEIGHTS, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    divisor = (weights * agree).sum(0)
    divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    return base + (stacked * agree).sum(0) / divisor, ambiguous


def layer_of(name: str, prefix: str) -> tuple[int, str] | None:
    match = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", name)
    return (int(match[1]), match[2]) if match else None


def check_merged(
    arch: zoo.Arch, method: str, inputs: list[dict[str, torch.Tensor]], out: Mapping[str, torch.Tensor]
) -> None:
    """The output against the recipe's meaning, computed here in float64."""
    x64 = [{n: t.double() for n, t in tensors.items()} for tensors in inputs]
    if method in ("linear", "ties"):
        assert set(out) == set(inputs[0]), f"tensors lost or invented: {set(inputs[0]) ^ set(out)}"
        for name, got in out.items():
            if method == "linear":
                want = sum(w * m[name] for w, m in zip(LINEAR_WEIGHTS, x64, strict=True)) / sum(
                    LINEAR_WEIGHTS
                )
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=name)
            else:
                want, ambiguous = ties64(x64[0][name], [x64[1][name], x64[2][name]])
                assert ambiguous.double().mean() < 0.05, name
                keep = ~ambiguous
                torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-5, atol=1e-6, msg=name)
        return
    expected_names = {name for name in inputs[0] if layer_of(name, arch.stack) is None}
    for out_index, (model, src_layer) in enumerate(STACKED):
        for source in inputs[model]:
            layer = layer_of(source, arch.stack)
            if layer is not None and layer[0] == src_layer:
                out_name = f"{arch.stack}.{out_index}.{layer[1]}"
                expected_names.add(out_name)
                assert torch.equal(out[out_name], inputs[model][source]), (
                    f"{out_name} is not {source} of model {model}"
                )
    assert set(out) == expected_names, f"tensors lost or invented: {expected_names ^ set(out)}"
    module = [n for n in out if n.startswith(arch.module)] if arch.module else []
    for name in module:  # the vision tower and projector: all from the first slice's model
        assert torch.equal(out[name], inputs[1][name]), f"{name} is not ft0's: the vision tower was split"
    for name in set(out) - set(module):
        if layer_of(name, arch.stack) is None:  # embeddings, norms, heads, an encoder: one model's, unchanged
            assert torch.equal(out[name], inputs[1][name]) or torch.equal(out[name], inputs[2][name]), name


def check_loads(
    arch: zoo.Arch, method: str, folder: Path, out: Mapping[str, torch.Tensor], tmp_path: Path
) -> None:
    """transformers loads the output with no missing or unexpected keys, at the stacked depth, with its values.

    The values are compared after saving the loaded model again: transformers renames (and fuses
    experts) as it loads, and undoes it as it saves.
    """
    auto = getattr(transformers, arch.auto)
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.save_pretrained(tmp_path / "saved-again")
    again = load_tensors(tmp_path / "saved-again")
    assert set(again) == set(out)
    for name, tensor in out.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
    depth = {layer[0] for n in again if (layer := layer_of(n, arch.stack))}
    assert depth == set(range(len(STACKED) if method == "passthrough" else zoo.LAYERS))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", zoo.ZOO, ids=[a.name for a in zoo.ZOO])
def test_zoo_merges_match_float64_and_load(
    arch: zoo.Arch,
    method: str,
    zoo_family: Callable[[zoo.Arch], Family],
    tmp_path: Path,
) -> None:
    models = zoo_family(arch)
    run_merge(
        validate_recipe(recipe(method, models)),
        tmp_path / "out",
        options=MergeOptions(device="cpu", verify=True),
    )
    out = load_tensors(tmp_path / "out")
    check_merged(arch, method, [load_tensors(p) for p in models], out)
    check_loads(arch, method, tmp_path / "out", out, tmp_path)


def test_passthrough_writes_the_language_models_count_where_the_config_keeps_it(
    zoo_family: Callable[[zoo.Arch], Family], tmp_path: Path
) -> None:
    arch = next(a for a in zoo.ZOO if a.name == "llama4")
    models = zoo_family(arch)
    source = read_json(models[1] / "config.json")["text_config"]
    run_merge(
        validate_recipe(recipe("passthrough", models)), tmp_path / "out", options=MergeOptions(device="cpu")
    )
    config = read_json(tmp_path / "out" / "config.json")
    text = config["text_config"]
    assert text["num_hidden_layers"] == 3 and "num_hidden_layers" not in config
    assert config["vision_config"]["num_hidden_layers"] == zoo.VISION_LAYERS
    assert source["moe_layers"] == [1] and text["moe_layers"] == [1, 2]  # indices, renumbered
    assert text["no_rope_layers"] == [source["no_rope_layers"][i] for i in (0, 1, 1)]  # one per layer
    assert text["layer_types"] == [source["layer_types"][i] for i in (0, 1, 1)]
