"""What tensor names and config.json say about a transformer's layer stacks, without per-architecture tables.

Checkpoints name their blocks ``<prefix>.<index>.<rest>`` (``model.layers.3.mlp``,
``transformer.h.3.attn``, ``model.visual.blocks.3``, ``encoder.block.3``); everything else
sits before the blocks (embeddings) or after them (final norm, output head). A checkpoint may
hold several stacks: a language model beside a vision tower, an encoder beside a decoder.
:func:`find_stacks` finds each one from the tensor names and gives it its role and the place
in config.json that keeps its layer count and per-layer settings (``text_config``,
``vision_config.depth``, ``decoder_layers``): the planner stacks, slices and interpolates one
stack (:func:`default_stack`, the language model's) and merges the others as plain tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from engine.errors import IncompatibleModelsError

# The first ``<word>.<index>.`` names the block: ``encoder.block.3.layer.0`` is block 3 of ``encoder.block``.
_LAYER = re.compile(
    r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|block|layer|decoder_layers))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
# Output heads that a checkpoint may omit when they share the input embedding's weights.
TIED_HEADS: Mapping[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
    "output.weight": ("tok_embeddings.weight", "model.tok_embeddings.weight"),
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

Role = Literal["language", "vision", "audio", "encoder", "decoder"]
# Where each role keeps its settings (the first sub-config present; else the top level) and its count.
_SECTIONS: Mapping[Role, tuple[str, ...]] = {
    "language": ("text_config", "llm_config", "language_config"),
    "vision": ("vision_config", "vision_tower_config"),
    "audio": ("audio_config",),
    "encoder": (),
    "decoder": (),
}
_COUNT_KEYS: Mapping[Role, tuple[str, ...]] = {
    "language": LAYER_COUNT_KEYS,
    "vision": ("depth", *LAYER_COUNT_KEYS),
    "audio": LAYER_COUNT_KEYS,
    "encoder": ("encoder_layers", "num_encoder_layers", *LAYER_COUNT_KEYS),
    "decoder": ("decoder_layers", "num_decoder_layers", *LAYER_COUNT_KEYS),
}
# The stack that gradients, slices and passthrough act on when a recipe names none.
_DEFAULT_ORDER: tuple[Role, ...] = ("language", "decoder", "encoder", "audio", "vision")
# Per-stack config lists that hold layer *indices* (not one entry per layer), whatever their length.
INDEX_LIST_KEYS = frozenset({"moe_layers", "mlp_only_layers", "dense_layers", "full_attention_layers"})


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def renumbered(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


@dataclass(frozen=True)
class LayerStack:
    """One run of numbered blocks (``model.language_model.layers.0`` ... ``.27``) and where its config lives.

    Attributes:
        role: what the stack is (language model, vision tower, encoder, ...).
        prefix: the tensor-name prefix before the layer index.
        count: its number of layers: config.json's figure where it gives one, else counted from names.
        section: the sub-config holding its settings (``text_config``); None for the top level.
        count_key: the key in that section holding ``count``; None when the config does not say.
    """

    role: Role
    prefix: str
    count: int
    section: str | None
    count_key: str | None

    def layer_of(self, name: str) -> LayerName | None:
        """The layer a tensor belongs to, if it is one of this stack's ``count`` layers."""
        parsed = parse_layer_name(name)
        if parsed is None or parsed.prefix != self.prefix or parsed.index >= self.count:
            return None
        return parsed

    def settings(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The part of ``config`` that describes this stack."""
        if self.section is None:
            return config
        section = config.get(self.section)
        return section if isinstance(section, Mapping) else {}


def parse_layer_name(name: str) -> LayerName | None:
    match = _LAYER.match(name)
    if match is None:
        return None
    return LayerName(match["prefix"], int(match["index"]), match["rest"])


def is_pre_weight(name: str) -> bool:
    """Non-layer tensors that come before the blocks: the embeddings."""
    return any(hint in name for hint in _EMBEDDING_HINTS) and name not in TIED_HEADS


# Words that mark a tensor of another module than the language model (a vision or audio tower, the
# projector between them): such tensors stay together, from one model, in a stacked merge.
_MODULE_HINTS = ("vision", "visual", "image", "audio", "speech", "projector", "multi_modal", "connector")


def is_other_module(name: str) -> bool:
    """Whether a tensor belongs to a vision or audio tower or its projector, by its name."""
    lowered = name.lower()
    return any(hint in lowered for hint in _MODULE_HINTS)


def _role(prefix: str) -> Role:
    words = prefix.lower().split(".")
    if any(w in ("vit", "siglip", "clip") or "vision" in w or "visual" in w or "image" in w for w in words):
        return "vision"
    if any("audio" in w or "speech" in w for w in words):
        return "audio"
    if any("language" in w or w.startswith("text") or w == "llm" for w in words):
        return "language"
    if "encoder" in words:
        return "encoder"
    if "decoder" in words:
        return "decoder"
    return "language"


def _section(config: Mapping[str, Any], role: Role) -> str | None:
    return next((key for key in _SECTIONS[role] if isinstance(config.get(key), Mapping)), None)


def _config_count(settings: Mapping[str, Any], role: Role) -> tuple[str, int] | None:
    for key in _COUNT_KEYS[role]:
        value = settings.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return key, value
    return None


def find_stacks(config: Mapping[str, Any], names: Iterable[str]) -> tuple[LayerStack, ...]:
    """Every layer stack of a checkpoint, from its tensor names and config.json.

    A stack's role comes from its prefix (``vision``/``visual`` words: the vision tower;
    ``encoder``/``decoder``; otherwise the language model), and its count from the role's
    config section. When several stacks share a role, the config's count goes to the one
    whose number of layers it equals (else to the deepest); the others are counted from names.
    """
    indices: dict[str, set[int]] = {}
    for name in names:
        parsed = parse_layer_name(name)
        if parsed:
            indices.setdefault(parsed.prefix, set()).add(parsed.index)
    by_role: dict[Role, list[str]] = {}
    for prefix in sorted(indices):
        by_role.setdefault(_role(prefix), []).append(prefix)
    stacks = []
    for role, prefixes in by_role.items():
        section = _section(config, role)
        settings = config.get(section, {}) if section else config
        counted = _config_count(settings, role)
        owner = None
        if counted is not None:
            equal = [p for p in prefixes if len(indices[p]) == counted[1]]
            owner = equal[0] if equal else max(prefixes, key=lambda p: len(indices[p]))
        for prefix in prefixes:
            if prefix == owner and counted is not None:
                stacks.append(LayerStack(role, prefix, counted[1], section, counted[0]))
            else:
                stacks.append(LayerStack(role, prefix, max(indices[prefix]) + 1, section, None))
    return tuple(stacks)


def default_stack(stacks: Iterable[LayerStack]) -> LayerStack | None:
    """The stack a recipe's layer numbers refer to: the language model's (else a decoder's, ...)."""
    ranked = sorted(
        stacks, key=lambda s: (_DEFAULT_ORDER.index(s.role), s.count_key is None, -s.count, s.prefix)
    )
    return ranked[0] if ranked else None


def _is_index_list(values: list[Any], count: int) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < count for v in values) and all(
        a < b for a, b in pairwise(values)
    )


def layer_lists(settings: Mapping[str, Any], count: int) -> dict[str, Literal["per_layer", "indices"]]:
    """The config lists of a stack that follow its layers: one entry per layer, or layer indices.

    Only keys that speak of layers (``layer_types``, ``no_rope_layers``, ``moe_layers``) are
    considered, so that unrelated lists which happen to have ``count`` entries are left alone.
    A list of increasing layer numbers is read as indices unless it has one entry per layer;
    :data:`INDEX_LIST_KEYS` are indices whatever their length.
    """
    found: dict[str, Literal["per_layer", "indices"]] = {}
    for key, value in settings.items():
        if not isinstance(value, list) or "layer" not in key.lower():
            continue
        if key in INDEX_LIST_KEYS or (value and len(value) != count and _is_index_list(value, count)):
            found[key] = "indices"
        elif len(value) == count and count:
            found[key] = "per_layer"
    return found


def restack_config(
    config: Mapping[str, Any], stack: LayerStack, layers: Sequence[tuple[Mapping[str, Any], int]]
) -> dict[str, Any]:
    """``config`` with ``stack`` rebuilt from ``layers``, one (source model's config, its layer) per output layer.

    The new count is written where the config keeps it (``text_config.num_hidden_layers``,
    ``decoder_layers``, and a top-level copy of it); per-layer lists take each output layer's
    entry from its source, and index lists (``moe_layers``) are renumbered to the output layers
    whose source was listed.

    Raises:
        IncompatibleModelsError: a source's per-layer list has no entry for its layer.
    """
    out = dict(config)
    before = stack.settings(config)
    settings = dict(before)
    if stack.count_key is not None:
        settings[stack.count_key] = len(layers)
    for key, kind in layer_lists(before, stack.count).items():
        fallback = settings[key]
        if kind == "per_layer":
            entries = []
            for cfg, layer in layers:
                values = _source_list(stack, cfg, key, fallback)
                if layer >= len(values):
                    raise IncompatibleModelsError(
                        f"`{key}` in a source model's config.json has {len(values)} entries, "
                        f"so layer {layer} cannot be stacked; the models do not share an architecture",
                        field=key,
                    )
                entries.append(values[layer])
            settings[key] = entries
        else:
            settings[key] = [
                i
                for i, (cfg, layer) in enumerate(layers)
                if layer in set(_source_list(stack, cfg, key, fallback))
            ]
    if isinstance(settings.get("max_window_layers"), int):
        settings["max_window_layers"] = min(settings["max_window_layers"], len(layers))
    if stack.section is None:
        out.update(settings)
    else:
        out[stack.section] = settings
        for key, value in settings.items():  # some configs repeat the language model's settings at the top
            if key in config and config[key] == before.get(key) and value != before.get(key):
                out[key] = value
    return out


def _source_list(stack: LayerStack, config: Mapping[str, Any], key: str, fallback: list[Any]) -> list[Any]:
    value = stack.settings(config).get(key)
    return value if isinstance(value, list) else fallback
