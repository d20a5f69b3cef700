"""What a tensor name says about its place in a transformer, without per-architecture tables.

Decoder-only checkpoints on the Hub name their blocks ``<prefix>.<index>.<rest>`` (``model.layers.3.mlp``,
``transformer.h.3.attn``, ``gpt_neox.layers.3``); everything else sits before the blocks
(embeddings) or after them (final norm, output head). That is all the planner needs to
stack layers, interpolate gradients and tie output heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer|decoder_layers))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
# Output heads that a checkpoint may omit when they share the input embedding's weights.
TIED_HEADS: Mapping[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
    "output.weight": ("tok_embeddings.weight", "model.tok_embeddings.weight"),
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def renumbered(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def parse_layer_name(name: str) -> LayerName | None:
    match = _LAYER.match(name)
    if match is None:
        return None
    return LayerName(match["prefix"], int(match["index"]), match["rest"])


def is_pre_weight(name: str) -> bool:
    """Non-layer tensors that come before the blocks: the embeddings."""
    return any(hint in name for hint in _EMBEDDING_HINTS) and name not in TIED_HEADS


def main_layer_prefix(names: Iterable[str]) -> str | None:
    """The block prefix with the most layers (the decoder, in a multimodal checkpoint)."""
    counts: dict[str, set[int]] = {}
    for name in names:
        parsed = parse_layer_name(name)
        if parsed:
            counts.setdefault(parsed.prefix, set()).add(parsed.index)
    if not counts:
        return None
    return max(counts, key=lambda p: len(counts[p]))


def layer_count(config: Mapping[str, Any], names: Iterable[str]) -> int:
    """Number of blocks: from config.json when it says, else counted from tensor names."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value >= 0:
            return value
    text = config.get("text_config")
    if isinstance(text, Mapping):
        for key in LAYER_COUNT_KEYS:
            value = text.get(key)
            if isinstance(value, int):
                return value
    prefix = main_layer_prefix(names)
    indices = {p.index for n in names if (p := parse_layer_name(n)) and p.prefix == prefix}
    return max(indices) + 1 if indices else 0


def layer_count_key(config: Mapping[str, Any]) -> str:
    return next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
