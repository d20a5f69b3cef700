"""Small demo models built on the spot: a Llama-shaped base and fine-tunes of it.

Random weights (no download is possible offline), but real checkpoints: transformers
loads them, and the fine-tunes differ from the base by small task vectors, as real
fine-tunes do, so every merge method has something meaningful to combine.
"""

from __future__ import annotations

import json
import os

import torch

DEMO_MODELS = ("base", "math-tune", "code-tune", "chat-tune")


def build_demo_models(
    folder: str, *, hidden: int = 64, layers: int = 4, vocab: int = 256, seed: int = 0
) -> dict[str, str]:
    """Write the demo family under ``folder`` (once; reused if present) and return name -> path."""
    from safetensors.torch import save_file

    paths = {name: os.path.join(folder, name) for name in DEMO_MODELS}
    if all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths.values()):
        return paths
    generator = torch.Generator().manual_seed(seed)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    kv = 2 * hidden // 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (hidden * 2, hidden),
            p + "mlp.up_proj.weight": (hidden * 2, hidden),
            p + "mlp.down_proj.weight": (hidden, hidden * 2),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    base = {
        name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
        for name, shape in shapes.items()
    }
    for index, name in enumerate(DEMO_MODELS):
        weights = base
        if index:
            weights = {k: v + 0.004 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        os.makedirs(paths[name], exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
            os.path.join(paths[name], "model.safetensors"),
            metadata={"format": "pt"},
        )
        with open(os.path.join(paths[name], "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(paths[name], "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    return paths
