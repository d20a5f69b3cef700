"""Benchmark models: a Llama-shaped base and three fine-tunes, written straight to safetensors.

Why not transformers' model init: initialising 0.5B parameters through ``nn.Module`` takes
minutes and holds the whole model (twice) in RAM. Here each tensor is drawn from its own
seeded ``torch.Generator`` (so the bytes do not depend on the order tensors are written in),
one shard at a time, and all four models' shards are written side by side: peak memory is
a few shards, not a model.

A fine-tune is ``base + delta`` with ``delta ~ N(0, (DELTA_SCALE * rms(tensor))^2)``, large
enough to survive bf16 rounding (a bf16 ulp is ~2^-8 of a value), so every merge method has
real task vectors to combine.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_NAMES = ("base", "ft1", "ft2", "ft3")
DELTA_SCALE = 2e-2
INIT_STD = 0.02
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class Shape:
    """A Llama architecture's sizes: enough to name every tensor and its shape."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    shards: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, in checkpoint order (untied lm_head)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            }
        shapes |= {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}
        return shapes

    def parameters(self) -> int:
        return sum(_numel(s) for s in self.tensors().values())

    def config(self) -> dict[str, object]:
        """config.json as transformers writes it for LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": INIT_STD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "bfloat16",
        }


SIZES: dict[str, Shape] = {
    # 0.49B parameters, 0.97 GB per model in bf16
    "0.5b": Shape(hidden=1024, intermediate=4352, layers=24, heads=16, kv_heads=16, shards=3),
    # 1.47B parameters, 2.9 GB per model in bf16
    "1.5b": Shape(hidden=2048, intermediate=5632, layers=26, heads=16, kv_heads=16, shards=4),
    # 0.3M parameters: a smoke run in seconds
    "tiny": Shape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=1024, shards=2),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _generator(name: str, stream: str) -> torch.Generator:
    """One generator per (tensor, stream): the bytes do not depend on write order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{stream}/{name}".encode()))


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights start at one
        return torch.ones(shape, dtype=torch.bfloat16)
    x = torch.randn(shape, generator=_generator(name, "base"))  # fp32, then rounded once
    return x.mul_(INIT_STD).to(torch.bfloat16)


def _fine_tune(base: torch.Tensor, name: str, tune: str) -> torch.Tensor:
    b = base.float()
    rms = b.pow(2).mean().sqrt().item()
    delta = torch.randn(b.shape, generator=_generator(name, tune))
    return b.add_(delta, alpha=DELTA_SCALE * rms).to(torch.bfloat16)


def _split_into_shards(tensors: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Consecutive groups of tensor names with about the same number of parameters each."""
    budget = sum(_numel(s) for s in tensors.values()) / shards
    groups: list[list[str]] = [[]]
    filled = 0
    for name, shape in tensors.items():
        if filled >= budget and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += _numel(shape)
    return groups


def build_models(folder: Path, shape: Shape) -> dict[str, Path]:
    """Write the base and its three fine-tunes under ``folder`` once; reuse them afterwards.

    Returns:
        Model name (``base``, ``ft1``..``ft3``) -> model folder.
    """
    from safetensors.torch import save_file

    paths = {name: folder / name for name in MODEL_NAMES}
    if all((p / COMPLETE_MARKER).exists() for p in paths.values()):
        return paths
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
        (p / COMPLETE_MARKER).unlink(missing_ok=True)
    tensors = shape.tensors()
    groups = _split_into_shards(tensors, shape.shards)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(groups, start=1):
        file_name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, dict[str, torch.Tensor]] = {model: {} for model in MODEL_NAMES}
        for name in names:
            base = _base_tensor(name, tensors[name])
            shard["base"][name] = base
            for tune in MODEL_NAMES[1:]:
                shard[tune][name] = _fine_tune(base, name, tune)
            weight_map[name] = file_name
        for model, contents in shard.items():
            save_file(contents, str(paths[model] / file_name), metadata={"format": "pt"})
        del shard
    total_size = sum(_numel(s) * 2 for s in tensors.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    for p in paths.values():
        (p / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        (p / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        (p / COMPLETE_MARKER).touch()
    return paths


def weight_files(model: Path) -> list[Path]:
    """A model folder's safetensors shards, from its index."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return [model / name for name in sorted(set(index["weight_map"].values()))]


def output_weight_files(folder: Path) -> list[Path]:
    """A merged model's safetensors files, whether one file or an indexed set."""
    if (folder / "model.safetensors.index.json").exists():
        return weight_files(folder)
    return sorted(folder.glob("*.safetensors"))
