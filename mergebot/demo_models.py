"""Small demo models built on the spot: a Llama-shaped base, fine-tunes of it, and their cards.

Random weights (no download is possible offline), but real checkpoints: transformers
loads them, and the fine-tunes differ from their parent by small task vectors, as real
fine-tunes do, so every merge method has something meaningful to combine. The family has
two generations of lineage (base -> fine-tunes -> a fine-tune of a fine-tune), parents under
different licences, and one model of another shape, to show what an incompatible merge says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

ORG = "demo-lab"


@dataclass(frozen=True)
class DemoModel:
    """One demo repo: its name, licence, parent (``base_model``) and what it is."""

    name: str
    license: str
    parent: str | None
    about: str
    hidden: int = 64

    @property
    def repo_id(self) -> str:
        return f"{ORG}/{self.name}"


DEMO_FAMILY: tuple[DemoModel, ...] = (
    DemoModel("tiny-base", "apache-2.0", None, "the base model every other demo model was fine-tuned from"),
    DemoModel("tiny-math", "mit", "tiny-base", "a fine-tune of tiny-base for arithmetic"),
    DemoModel("tiny-code", "apache-2.0", "tiny-base", "a fine-tune of tiny-base for code"),
    DemoModel("tiny-chat", "cc-by-nc-4.0", "tiny-base", "a non-commercial chat fine-tune of tiny-base"),
    DemoModel("tiny-llama-style", "llama3", "tiny-base", "a fine-tune under a Llama-3-style licence"),
    DemoModel(
        "tiny-math-pro", "mit", "tiny-math", "a fine-tune of tiny-math (two generations from the base)"
    ),
    DemoModel("wide-base", "apache-2.0", None, "an unrelated model with a larger hidden size", hidden=96),
)
DEMO_MODELS = tuple(m.name for m in DEMO_FAMILY)


def _config(hidden: int, layers: int, vocab: int) -> dict[str, object]:
    return {
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


def _shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
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
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def model_card(model: DemoModel) -> str:
    """The README.md of a demo repo: licence and ``base_model`` in the front matter."""
    meta = [f"license: {model.license}", "library_name: transformers", "tags: [mergebot-demo]"]
    if model.parent:
        meta.append(f"base_model: {ORG}/{model.parent}")
    return "---\n" + "\n".join(meta) + f"\n---\n\n# {model.name}\n\nA tiny demo model: {model.about}.\n"


def build_demo_models(folder: str, *, layers: int = 4, vocab: int = 256, seed: int = 0) -> dict[str, str]:
    """Write the demo family under ``folder`` (once; reused if present) and return name -> path.

    Each folder holds model.safetensors, config.json, generation_config.json and README.md.
    """
    from safetensors.torch import save_file

    paths = {m.name: os.path.join(folder, m.name) for m in DEMO_FAMILY}
    if all(os.path.exists(os.path.join(p, "README.md")) for p in paths.values()):
        return paths
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for model in DEMO_FAMILY:
        if model.parent is None:
            tensors = {
                name: (
                    torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                )
                for name, shape in _shapes(model.hidden, layers, vocab).items()
            }
        else:  # parent + a small task vector
            tensors = {
                k: v + 0.004 * torch.randn(v.shape, generator=generator)
                for k, v in weights[model.parent].items()
            }
        weights[model.name] = tensors
        path = paths[model.name]
        os.makedirs(path, exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"},
        )
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config(model.hidden, layers, vocab), f, indent=2)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
        with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model))
    return paths
