"""Tiny but real causal LMs, built locally from seeds, for merge tests.

Why not download a small checkpoint: tests must run offline, in seconds, and
know exactly how the models relate. A *family* is a base plus fine-tunes that
are ``base + small random delta``, so task vectors are meaningful (and survive
bf16 rounding), while unrelated models (different seeds) exercise SLERP away
from its collinear fallback.

Every folder looks like a Hub snapshot: ``config.json``, safetensors weights
(one file or several shards + index), ``generation_config.json`` and a tiny
byte-level BPE tokenizer (96 tokens) wrapped in ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

Arch = Literal["llama", "qwen2", "mistral"]
DType = Literal["bfloat16", "float32"]

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# A multiple of 8 keeps shapes friendly; build_tokenizer checks it gets exactly this many.
VOCAB_SIZE = 96
# Qwen2's pre-tokenizer split: AutoTokenizer rebuilds qwen2 tokenizers as Qwen2Tokenizer from
# vocab + merges with this regex, so a byte-level BPE with the same split round-trips for
# every architecture here (Llama/Mistral load it as TokenizersBackend).
_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_CORPUS_TEXT = (
    "the a cat dog sat on mat ran to big small red blue green and is was model merge layer "
    "weight tensor base tune slerp ties dare linear pass through slice token embed norm head"
)
_CORPUS_WORDS: tuple[str, ...] = tuple(_CORPUS_TEXT.split())

_TORCH_DTYPES: dict[DType, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    """Shape and storage of one tiny model; frozen so fixtures can key on it."""

    arch: Arch = "llama"
    num_layers: int = 4
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_word_embeddings: bool = False
    dtype: DType = "bfloat16"
    # e.g. "40KB" gives several shards plus model.safetensors.index.json
    max_shard_size: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class Family:
    """A base model and fine-tunes of it, as folders on disk."""

    base: Path
    finetunes: tuple[Path, ...]
    spec: ModelSpec

    @property
    def models(self) -> tuple[Path, ...]:
        return (self.base, *self.finetunes)


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; training is deterministic for a fixed corpus."""
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False, min_frequency=1
    )
    n = len(_CORPUS_WORDS)
    corpus = (" ".join(_CORPUS_WORDS[(7 * i + 3 * j) % n] for j in range(8)) + "." for i in range(300))
    core.train_from_iterator(corpus, trainer=trainer)
    if core.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {core.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return core.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly ``VOCAB_SIZE`` tokens (specials first)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_config(spec: ModelSpec) -> PretrainedConfig:
    """The transformers config for ``spec`` (Qwen2 gets ``layer_types`` from transformers 5)."""
    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    if spec.arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown architecture {spec.arch!r}; expected llama, qwen2 or mistral")


def _model_class(spec: ModelSpec) -> type[PreTrainedModel]:
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    classes: dict[str, type[PreTrainedModel]] = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "mistral": MistralForCausalLM,
    }
    return classes[spec.arch]


def random_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights for every persistent tensor of ``spec``, from ``seed`` alone.

    Matrices ~ N(0, 1/fan_in) so activations stay O(1); norm weights ~ 1 + N(0, 0.1)
    and biases ~ N(0, 0.1), so no tensor is constant (a constant tensor hides
    wrong-index bugs).
    """
    shapes = _weight_shapes(spec)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            out[name] = 0.1 * noise
        else:
            out[name] = noise / math.sqrt(shape[-1])
    return out


def _weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors ``save_pretrained`` writes for ``spec``."""
    with torch.device("meta"):
        model = _model_class(spec)(build_config(spec))
    state = model.state_dict()
    if spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tuple(t.shape) for name, t in state.items()}


def save_model(path: Path, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> Path:
    """Write ``weights`` as a Hub-style folder: weights, config, tokenizer, generation config."""
    config = build_config(spec)
    model = _model_class(spec)(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # lm_head is legitimately absent from a tied checkpoint; anything else is a bug here.
    allowed_missing = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"weights do not fit {spec.arch}: missing={missing} unexpected={unexpected}")
    model = model.to(spec.torch_dtype)  # type: ignore[arg-type]  # transformers' stub of .to
    path.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, object] = {"safe_serialization": True}
    if spec.max_shard_size is not None:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(path, **kwargs)
    build_tokenizer().save_pretrained(path)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=8
    ).save_pretrained(path)
    return path


def build_model(path: Path, spec: ModelSpec, seed: int) -> Path:
    """One model with independent random weights (different seed -> unrelated model)."""
    return save_model(path, spec, random_weights(spec, seed))


def finetune_weights(base: dict[str, torch.Tensor], seed: int, delta_scale: float) -> dict[str, torch.Tensor]:
    """``base + delta`` with delta ~ N(0, (delta_scale * rms(tensor))^2), per tensor.

    Why rms-relative: the default 2e-2 is ~5 bf16 ulps of a typical element, so the
    task vector survives bf16 storage in every tensor, norms included.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(base):
        tensor = base[name]
        rms = tensor.pow(2).mean().sqrt()
        out[name] = tensor + delta_scale * rms * torch.randn(tensor.shape, generator=gen)
    return out


def build_family(
    root: Path,
    spec: ModelSpec,
    *,
    n_finetunes: int = 2,
    seed: int = 0,
    delta_scale: float = 2e-2,
) -> Family:
    """A base (``root/base``) and ``n_finetunes`` fine-tunes (``root/ft{i}``).

    The base is rounded to the storage dtype before the deltas are added, so a
    fine-tune's stored task vector is exactly ``round(base + delta) - base``.
    """
    base_weights = {name: t.to(spec.torch_dtype).float() for name, t in random_weights(spec, seed).items()}
    base = save_model(root / "base", spec, base_weights)
    finetunes = tuple(
        save_model(root / f"ft{i}", spec, finetune_weights(base_weights, seed * 1000 + i + 1, delta_scale))
        for i in range(n_finetunes)
    )
    return Family(base=base, finetunes=finetunes, spec=spec)


def read_config(path: Path) -> dict[str, object]:
    """config.json of a model folder, as a dict."""
    with open(path / "config.json", encoding="utf-8") as fp:
        data: dict[str, object] = json.load(fp)
    return data
