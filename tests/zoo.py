"""A zoo of tiny random models, one per architecture family, built with transformers' own config classes.

Why these: each family names its tensors and keeps its layer settings its own way (``transformer.h``,
``encoder.block``, ``text_config.layer_types``, ``moe_layers``), and the multimodal ones have a vision
tower deeper than their language model, so a planner that takes "the longest run of indices" for the
language model fails on them. Sizes are the smallest each config accepts (hidden 16, 2 language
layers, 4 vision layers), so a family of three is built in well under a second.

Each entry also says, independently of the engine, which tensors form the language model's layers
(``stack``) and which belong to another module kept whole in a stacked merge (``module``), by the
names ``save_pretrained`` writes: for the multimodal models these are the names on the Hub
(``visual.blocks``, ``language_model.model.layers``), which transformers renames as it loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf

VOCAB = 64
LAYERS = 2  # of the language model (or the decoder)
VISION_LAYERS = 4  # deeper than the language model, on purpose
_H: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    num_hidden_layers=LAYERS,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo.

    Attributes:
        name: short name (the test id).
        config: builds the transformers config.
        auto: the transformers Auto class that builds its model.
        stack: prefix of the language model's (or decoder's) layers: ``<stack>.<i>.<rest>``.
        module: name prefixes of the other modules (vision tower, projector), taken whole from one model.
    """

    name: str
    config: Callable[[], Any]
    auto: str = "AutoModelForCausalLM"
    stack: str = "model.layers"
    module: tuple[str, ...] = ()


def _text(cls: Any, **extra: Any) -> Callable[[], Any]:
    return lambda: cls(**{**_H, **extra})


def _vision_clip() -> Any:
    return tf.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )


def _vision_siglip() -> Any:
    return tf.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )


def _no_kv(h: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in h.items() if k != "num_key_value_heads"}


ZOO: tuple[Arch, ...] = (
    Arch("llama", _text(tf.LlamaConfig)),
    Arch("mistral", _text(tf.MistralConfig, sliding_window=None)),
    Arch("qwen2", _text(tf.Qwen2Config)),
    Arch("qwen3", _text(tf.Qwen3Config, head_dim=8)),
    Arch(
        "qwen3_moe",
        _text(tf.Qwen3MoeConfig, head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16),
    ),
    Arch("mixtral", _text(tf.MixtralConfig, num_local_experts=2, num_experts_per_tok=1)),
    Arch(
        "deepseek_v3",
        _text(
            tf.DeepseekV3Config,
            moe_intermediate_size=16,
            n_routed_experts=2,
            n_shared_experts=1,
            num_experts_per_tok=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    Arch("gemma", _text(tf.GemmaConfig, head_dim=8)),
    Arch("gemma2", _text(tf.Gemma2Config, head_dim=8)),
    Arch("gemma3_text", _text(tf.Gemma3TextConfig, head_dim=8)),
    Arch("phi", lambda: tf.PhiConfig(**_no_kv(_H))),
    Arch("phi3", _text(tf.Phi3Config)),
    Arch(
        "gpt2",
        lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=64),
        stack="transformer.h",
    ),
    Arch("gpt_neox", lambda: tf.GPTNeoXConfig(**_no_kv(_H)), stack="gpt_neox.layers"),
    Arch(
        "falcon",
        lambda: tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            new_decoder_architecture=False,
        ),
        stack="transformer.h",
    ),
    Arch("starcoder2", _text(tf.Starcoder2Config)),
    Arch("olmo2", _text(tf.Olmo2Config)),
    Arch("cohere", _text(tf.CohereConfig)),
    Arch("granite", _text(tf.GraniteConfig)),
    Arch(
        "t5",
        lambda: tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=LAYERS, num_heads=2),
        auto="AutoModelForSeq2SeqLM",
        stack="decoder.block",
    ),
    Arch(
        "bart",
        lambda: tf.BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
        ),
        auto="AutoModelForSeq2SeqLM",
        stack="model.decoder.layers",
    ),
    Arch(
        "qwen2_vl",
        lambda: tf.Qwen2VLConfig(
            text_config={**_H, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            vision_config=dict(
                depth=VISION_LAYERS,
                embed_dim=16,
                hidden_size=16,
                num_heads=2,
                mlp_ratio=2,
                patch_size=2,
                spatial_merge_size=1,
                temporal_patch_size=1,
            ),
            bos_token_id=1,
            eos_token_id=2,
        ),
        auto="AutoModelForImageTextToText",
        stack="model.layers",
        module=("visual.",),
    ),
    Arch(
        "llava",
        lambda: tf.LlavaConfig(
            text_config=tf.LlamaConfig(**_H), vision_config=_vision_clip(), image_seq_length=4
        ),
        auto="AutoModelForImageTextToText",
        stack="language_model.model.layers",
        module=("vision_tower.", "multi_modal_projector."),
    ),
    Arch(
        "gemma3",
        lambda: tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**_H, head_dim=8),
            vision_config=_vision_siglip(),
            mm_tokens_per_image=4,
        ),
        auto="AutoModelForImageTextToText",
        stack="language_model.model.layers",
        module=("vision_tower.", "multi_modal_projector."),
    ),
    Arch(
        "llama4",
        lambda: tf.Llama4Config(
            text_config=tf.Llama4TextConfig(
                **_H, intermediate_size_mlp=32, num_local_experts=2, head_dim=8, interleave_moe_layer_step=2
            ),
            vision_config=tf.Llama4VisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=VISION_LAYERS,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
                vision_output_dim=16,
                projector_input_dim=16,
                projector_output_dim=16,
            ),
        ),
        auto="AutoModelForImageTextToText",
        stack="language_model.model.layers",
        module=("vision_model.", "multi_modal_projector."),
    ),
)


def build_model(arch: Arch) -> Any:
    """The transformers model of ``arch`` with transformers' own initial weights (float32, on the CPU)."""
    auto = getattr(tf, arch.auto)
    return auto.from_config(arch.config())


def randomize(
    model: Any, seed: int, base: dict[str, torch.Tensor] | None = None, scale: float = 0.05
) -> None:
    """Give every tensor seeded random values: fresh ones, or ``base`` plus a small delta (a fine-tune).

    Norm weights are ~ 1 + N(0, 0.1), everything else ~ N(0, 1/fan_in); no tensor is constant,
    so a tensor read from the wrong layer or model always shows.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if base is not None:
                value = base[name] + scale * base[name].abs().mean().clamp_min(1e-3) * noise
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = noise / math.sqrt(tensor.shape[-1] if tensor.dim() else 1)
            tensor.copy_(value)


def build_family(arch: Arch, root: Path, n_finetunes: int = 2) -> tuple[Path, ...]:
    """``root/base`` and ``root/ft{i}``: a random base and fine-tunes that are the base plus noise."""
    model = build_model(arch)
    randomize(model, seed=1)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    for i in range(n_finetunes):
        randomize(model, seed=100 + i, base=base)
        paths.append(root / f"ft{i}")
        model.save_pretrained(paths[-1])
    return tuple(paths)
