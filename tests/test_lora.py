"""LoRA adapters applied on the fly (``base+adapter``): PEFT's numbers, mergekit's merges, from the Hub.

The adapters are real PEFT adapters, built in the test with random non-zero A and B (PEFT
initialises B to zero, which would hide a wrong formula), then saved as PEFT saves them.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import load_tensors, recipe_dict, recipe_yaml
from safetensors.torch import save_file
from tiny_models import Family

from engine import (
    IncompatibleModelsError,
    MergeOptions,
    ModelNotFoundError,
    UnsafeWeightsError,
    load_recipe,
    run_merge,
)
from engine.sources import LoraModel, open_model

BF16_RTOL = 2.0**-7


def make_adapter(
    base: Path, out: Path, *, seed: int, std: float, safe: bool = True, **lora: Any
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a PEFT LoRA adapter for ``base`` with random factors; return it and PEFT's merged state."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    embedding = "embed_tokens" in lora.get("target_modules", ())
    with warnings.catch_warnings():
        # PEFT's check for unsaved ZeRO-3 shards takes LoRA biases (1-D by nature) for broken ones
        warnings.filterwarnings("ignore", message=".*LoRA tensor.s. have invalid shape")
        peft_model.save_pretrained(out, safe_serialization=safe, save_embedding_layers=embedding)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return out, merged


ADAPTERS = {
    # embedding LoRA (PEFT also saves the embedding whole), modules_to_save, rank and alpha patterns
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
    # rank-stabilised scale alpha / sqrt(r), and LoRA biases (Qwen2's q/k projections have biases)
    "rslora-bias": dict(
        r=3, lora_alpha=5, target_modules=["q_proj", "k_proj"], use_rslora=True, lora_bias=True
    ),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_on_the_fly_equals_peft_merge_and_unload(qwen2_family_f32: Family, tmp_path: Path, kind: str) -> None:
    family = qwen2_family_f32
    adapter, merged = make_adapter(family.base, tmp_path / "adapter", seed=1, std=0.1, **ADAPTERS[kind])
    with closing(open_model(f"{family.base}+{adapter}")) as source:
        assert isinstance(source, LoraModel)
        assert source.updated  # the adapter changes something
        assert sorted(source.tensors()) == sorted(merged)
        for name, want in merged.items():
            got = source.read(name)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        changed = {n for n in merged if not torch.equal(source.read(n), source.base.read(n))}
        assert changed == {*source.updated, *source.replaced}


def test_fan_in_fan_out_and_requested_dtype_by_hand(tmp_path: Path) -> None:
    """A GPT-2 style Conv1D weight is stored [in, out]: the update is (B @ A).T."""
    base = tmp_path / "base"
    base.mkdir()
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10  # [in=4, out=3]
    save_file({"h.0.attn.c_attn.weight": w.to(torch.bfloat16)}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 1.0, 0.0, 0.0]])  # [r=2, in=4]
    b = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]])  # [out=3, r=2]
    save_file(
        {
            "base_model.model.h.0.attn.c_attn.lora_A.weight": a,
            "base_model.model.h.0.attn.c_attn.lora_B.weight": b,
        },
        str(adapter / "adapter_model.safetensors"),
    )
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "fan_in_fan_out": True, "use_rslora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    want = w.to(torch.bfloat16).float() + (b @ a).T / math.sqrt(2)
    with closing(open_model(f"{base}+{adapter}")) as source:
        torch.testing.assert_close(source.read("h.0.attn.c_attn.weight"), want.to(torch.bfloat16))
        torch.testing.assert_close(source.read("h.0.attn.c_attn.weight", torch.float32), want)
        assert source.tensors()["h.0.attn.c_attn.weight"].dtype == "BF16"


# --- merges against mergekit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_adapter(
    tmp_path_factory: pytest.TempPathFactory, llama_family: Family
) -> tuple[Path, dict[str, torch.Tensor]]:
    """An adapter whose update is a few percent of the weights, like a fine-tune's."""
    root = tmp_path_factory.mktemp("llama-adapter")
    return make_adapter(
        llama_family.base,
        root / "adapter",
        seed=2,
        std=0.035,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    )


def run_mergekit_with_lora(recipe: dict[str, Any], out: Path, cache: Path) -> Path:
    """mergekit merges the adapter into a full copy of the base in ``cache`` first."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions as MergekitOptions

    options = MergekitOptions(random_seed=42, device="cpu", quiet=True, lora_merge_cache=str(cache))
    mergekit_run(MergeConfiguration.model_validate(recipe_dict(recipe)), str(out), options=options)
    return out


def ties64(base: torch.Tensor, models: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES at density 1 in float64: sign election by summed weighted deltas, disjoint weighted mean."""
    deltas = torch.stack([w * (m - base) for m, w in zip(models, weights, strict=True)])
    elected = deltas.sum(0).sign()
    mask = deltas.sign() == elected
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    divisor = (w * mask).sum(0)
    divisor[divisor.abs() < 1e-8] = 1
    return base + (deltas * mask).sum(0) / divisor


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_with_adapter_matches_mergekit(
    llama_family: Family,
    llama_adapter: tuple[Path, dict[str, torch.Tensor]],
    tmp_path: Path,
    method: str,
    parity_report: Any,
) -> None:
    family = llama_family
    adapter, peft_merged = llama_adapter
    lora_ref = f"{family.base}+{adapter}"
    params = {"weight": 0.6} if method == "linear" else {"weight": 0.6, "density": 1.0}
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": str(family.finetunes[0]), "parameters": {**params, "weight": 0.4}},
            {"model": lora_ref, "parameters": params},
        ],
    }
    if method == "ties":
        recipe["base_model"] = str(family.base)
    mk = load_tensors(run_mergekit_with_lora(recipe, tmp_path / "mergekit", tmp_path / "lora-cache"))
    run_merge(load_recipe(recipe_yaml(recipe)), tmp_path / "ours")
    ours = load_tensors(tmp_path / "ours")
    assert sorted(ours) == sorted(mk)
    base = load_tensors(family.base)
    finetune = load_tensors(family.finetunes[0])
    for name in sorted(mk):
        a, b = ours[name], mk[name]
        assert a.dtype == b.dtype == torch.bfloat16
        # float64 reading of the recipe, with the adapter applied exactly (PEFT's float32 merge)
        parent = peft_merged[name].double()
        x, y = finetune[name].double(), base[name].double()
        exact = 0.4 * x + 0.6 * parent if method == "linear" else ties64(y, [x, parent], [0.4, 0.6])
        rel_mk = (a.double() - b.double()).norm().item() / b.double().norm().item()
        parity_report(f"{method} base+lora mergebot~mergekit", name, rel_mk)
        if method == "linear":
            # ours rounds once, from float32 inputs: within one bf16 ulp of the exact result
            torch.testing.assert_close(a.float(), exact.float(), rtol=BF16_RTOL, atol=1e-5)
            assert rel_mk <= 5e-3, f"{name}: {rel_mk:.2e}"
        else:
            # mergekit stores the merged parent in bf16 and does the TIES math in bf16
            assert rel_mk <= 1e-2, f"{name}: {rel_mk:.2e}"
        err_ours = (a.double() - exact).norm().item()
        err_mk = (b.double() - exact).norm().item()
        assert err_ours <= err_mk + 1e-6 * exact.norm().item(), f"{name}: farther from float64 than mergekit"


# --- refusals --------------------------------------------------------------------------------------


def test_pickled_adapter_needs_allow_pickle(
    llama_family: Family, llama_adapter: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    adapter, _ = llama_adapter
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_tensors_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pickled"):
        open_model(f"{llama_family.base}+{pickled}")
    name = "model.layers.1.self_attn.q_proj.weight"
    with (
        closing(open_model(f"{llama_family.base}+{pickled}", allow_pickle=True)) as allowed,
        closing(open_model(f"{llama_family.base}+{adapter}")) as reference,
    ):
        assert torch.equal(allowed.read(name), reference.read(name))


def load_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_unsupported_and_mismatched_adapters_are_named(
    llama_family: Family,
    llama_adapter: tuple[Path, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    adapter, _ = llama_adapter
    other = tmp_path / "other-shapes"
    shutil.copytree(adapter, other)
    factors = load_tensors_file(other / "adapter_model.safetensors")
    factors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = torch.ones(4, 32)
    save_file(factors, str(other / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleModelsError, match=r"layers.1.mlp.down_proj.weight.*another base model"):
        open_model(f"{llama_family.base}+{other}")
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    settings = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ModelNotFoundError, match="DoRA"):
        open_model(f"{llama_family.base}+{dora}")
    with pytest.raises(ModelNotFoundError, match="exactly one"):
        open_model(f"{llama_family.base}+{adapter}+{adapter}")
    with pytest.raises(ModelNotFoundError, match=r"no adapter_config\.json"):
        open_model(f"{llama_family.base}+{llama_family.finetunes[0]}")


# --- from the Hub -------------------------------------------------------------------------------------

TOKEN = "hf_alice_secret_token"


@pytest.fixture(scope="module")
def hub_with_adapter(
    tmp_path_factory: pytest.TempPathFactory,
    llama_family: Family,
    llama_adapter: tuple[Path, dict[str, torch.Tensor]],
) -> Iterator[str]:
    from huggingface_hub import HfApi

    from localhub.testing import run_localhub

    with run_localhub(tmp_path_factory.mktemp("hub")) as hub:
        hub.add_user("alice", TOKEN)
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        for name, path in (("base", llama_family.base), ("adapter", llama_adapter[0])):
            api.create_repo(f"alice/{name}")
            api.upload_folder(repo_id=f"alice/{name}", folder_path=str(path))
        yield hub.endpoint


def test_hub_adapter_merges_as_local(
    hub_with_adapter: str,
    llama_family: Family,
    llama_adapter: tuple[Path, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    # tokenizer_source reads the vocabularies through the sources: the LoRA model's is its base's
    recipe = (
        "merge_method: linear\nmodels:\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {lora}\n    parameters: {{weight: 0.5}}\ntokenizer_source: union\n"
    )
    hub_recipe = load_recipe(
        recipe.format(ft=llama_family.finetunes[0], lora="alice/base+alice/adapter@main")
    )
    local_recipe = load_recipe(
        recipe.format(ft=llama_family.finetunes[0], lora=f"{llama_family.base}+{llama_adapter[0]}")
    )
    options = MergeOptions(hub_endpoint=hub_with_adapter, hub_token=TOKEN)
    run_merge(hub_recipe, tmp_path / "hub", options=options)
    run_merge(local_recipe, tmp_path / "local")
    hub_out, local_out = load_tensors(tmp_path / "hub"), load_tensors(tmp_path / "local")
    assert sorted(hub_out) == sorted(local_out)
    for name in hub_out:
        assert torch.equal(hub_out[name], local_out[name]), name
    assert (tmp_path / "hub" / "tokenizer.json").read_bytes() == (
        llama_family.base / "tokenizer.json"
    ).read_bytes()
