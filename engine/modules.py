"""Which module of a multi-module model a tensor belongs to, for recipes with ``modules:``.

mergekit names the parts of a vision-language model ``text_decoder``, ``vision_tower`` (or
``vision_model``) and ``multi_modal_projector``, and a ``modules:`` recipe merges each part
with its own models, slices and parameters. Checkpoints name those parts by the prefix of
their tensors, in either of the layouts transformers has saved:

- ``language_model.model.layers.0...``, ``vision_tower.vision_model.encoder.layers.0...``,
  ``multi_modal_projector.linear_1.weight`` (Gemma 3, Mistral 3 / Pixtral, Llama 4, LLaVA);
- ``model.language_model.layers.0...``, ``model.vision_tower...``, ``model.multi_modal_projector...``
  (the same models saved by newer transformers);
- ``model.layers.0...``, ``visual.blocks.0...``, ``visual.merger...`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

A tensor belongs to the module whose prefix matches it longest; tensors no prefix matches
(the decoder's blocks, embeddings, final norm and ``lm_head``) belong to ``text_decoder``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TEXT_MODULE = "text_decoder"
_PREFIXES: Mapping[str, tuple[str, ...]] = {
    "vision_tower": ("vision_tower.", "model.vision_tower.", "visual.", "model.visual."),
    "vision_model": ("vision_model.", "model.vision_model."),
    "multi_modal_projector": (
        "multi_modal_projector.",
        "model.multi_modal_projector.",
        "visual.merger.",
        "model.visual.merger.",
        "visual.deepstack_merger_list.",
        "model.visual.deepstack_merger_list.",
    ),
}
MODULE_NAMES: tuple[str, ...] = (TEXT_MODULE, *_PREFIXES)
# Where a module's own config sits in a multi-module config.json (its layer count, for one).
_CONFIG_KEYS: Mapping[str, str] = {
    TEXT_MODULE: "text_config",
    "vision_tower": "vision_config",
    "vision_model": "vision_config",
}


def module_of(tensor_name: str) -> str:
    """The module a tensor belongs to (``text_decoder`` when no other module's prefix matches)."""
    best, length = TEXT_MODULE, 0
    for module, prefixes in _PREFIXES.items():
        for prefix in prefixes:
            if tensor_name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


def module_tensors(names: Iterable[str], module: str) -> list[str]:
    """The names, in their order, that belong to ``module``."""
    return [n for n in names if module_of(n) == module]


def module_config_key(config: Mapping[str, Any], module: str) -> str | None:
    """The key of the module's own section of ``config`` (``text_config``...), None when it has none.

    A text decoder without a ``text_config`` (Qwen2-VL) keeps its settings at the top level.
    """
    key = _CONFIG_KEYS.get(module)
    return key if key is not None and isinstance(config.get(key), Mapping) else None


def module_config(config: Mapping[str, Any], module: str) -> Mapping[str, Any]:
    """The part of a model's config.json that describes ``module`` (its layer count, vocabulary).

    The top-level config for a text decoder without ``text_config``; nothing for a projector.
    """
    key = module_config_key(config, module)
    if key is not None:
        section: Mapping[str, Any] = config[key]
        return section
    return config if module == TEXT_MODULE else {}
