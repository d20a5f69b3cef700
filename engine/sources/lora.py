"""A base model with a PEFT LoRA adapter applied on the fly, tensor by tensor.

A recipe names such a model as mergekit does, ``base+adapter`` (each part a local folder
or a Hub id ``org/name[@revision]``). mergekit merges the adapter into a full copy of the
base on disk first; here nothing is written: reading an adapted tensor reads the base
tensor and the adapter's two factors and returns, in float32 before any rounding,

    W' = W + scale * (B @ A)              # W: [out, in], B: [out, r], A: [r, in]

(transposed when ``fan_in_fan_out``; for an embedding, ``lora_embedding_A`` is [r, vocab]
and ``lora_embedding_B`` [dim, r], so the update is ``(B @ A).T``). ``scale`` is
``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, where ``r`` and ``alpha`` come
from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module (PEFT's rule:
the pattern, a regular expression, matches the end of the module path after a dot).
Full tensors in the adapter (``modules_to_save``, and the embedding PEFT saves with an
embedding LoRA) replace the base's tensor, as PEFT's ``merge_and_unload`` does. With
``ensure_weight_tying``, PEFT also saves the tied output head's LoRA (or whole copy) beside the
embedding's; a base that stores no head reads it from the embedding, so those entries are skipped.

Refused, with a message: other PEFT types, DoRA, LoRA on parameters (``target_parameters``),
trainable token indices, convolution LoRA, and adapters whose weights are only pickled
(unless pickle is allowed, and then only through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine.architecture import TIED_HEADS
from engine.errors import IncompatibleModelsError, ModelNotFoundError
from engine.sources.base import ModelSource, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_FACTORS = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


@dataclass(frozen=True)
class LoraUpdate:
    """The low-rank update of one base tensor: ``scale * (B @ A)`` (transposed if ``transpose``)."""

    target: str  # the base tensor it updates, e.g. model.layers.0.self_attn.q_proj.weight
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool
    bias: str | None = None  # lora_B.bias (PEFT's lora_bias), added to the module's bias


def split_reference(reference: str) -> tuple[str, str] | None:
    """``base+adapter`` -> (base, adapter); None when the reference names no adapter.

    Raises:
        ModelNotFoundError: more than one ``+`` (mergekit refuses these too).
    """
    if "+" not in reference:
        return None
    parts = reference.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ModelNotFoundError(
            reference, "a LoRA reference is 'base+adapter': exactly one '+' between two model references"
        )
    return parts[0].strip(), parts[1].strip()


def _pattern_value(patterns: Mapping[str, Any], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


class LoraModel:
    """A :class:`ModelSource` whose tensors are the base's with the adapter applied."""

    def __init__(self, reference: str, base: ModelSource, adapter: ModelSource) -> None:
        self.reference = reference
        self.base = base
        self.adapter = adapter
        self._base_tensors = base.tensors()
        adapter_tensors = adapter.tensors()
        settings = self._settings()
        self._updates: dict[str, LoraUpdate] = {}
        self._replaced: dict[str, str] = {}  # base tensor name -> adapter tensor name
        self._parse(adapter_tensors, settings)
        self._skip_tied_heads()
        self._tensors = dict(self._base_tensors)
        for target, key in self._replaced.items():
            self._tensors[target] = adapter_tensors[key]
        self._check_shapes(adapter_tensors)
        self._bias_updates = {
            u.target.removesuffix(".weight") + ".bias": u
            for u in self._updates.values()
            if u.bias is not None
        }

    # -- adapter layout -----------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        if ADAPTER_CONFIG not in self.adapter.files():
            raise ModelNotFoundError(
                self.reference, f"the adapter '{self.adapter.reference}' has no {ADAPTER_CONFIG}"
            )
        try:
            settings = json.loads(self.adapter.read_file(ADAPTER_CONFIG))
        except ValueError as exc:
            raise ModelNotFoundError(self.reference, f"{ADAPTER_CONFIG} is not valid JSON ({exc})") from None
        if not isinstance(settings, dict):
            raise ModelNotFoundError(self.reference, f"{ADAPTER_CONFIG} is not a JSON object")
        unsupported = [
            (settings.get("peft_type", "LORA") != "LORA", f"it is a {settings.get('peft_type')} adapter"),
            (bool(settings.get("use_dora")), "it uses DoRA (weight-decomposed LoRA)"),
            (bool(settings.get("target_parameters")), "it adapts parameters (`target_parameters`)"),
            (bool(settings.get("trainable_token_indices")), "it trains token indices"),
        ]
        for bad, why in unsupported:
            if bad:
                raise ModelNotFoundError(
                    self.reference, f"{why}, which is not supported; only plain LoRA adapters are"
                )
        return settings

    def _parse(self, adapter_tensors: Mapping[str, TensorInfo], settings: Mapping[str, Any]) -> None:
        factors: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        biases: dict[str, str] = {}
        for key in adapter_tensors:
            name = key.removeprefix(_PREFIX)
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            for suffix, (kind, which) in _FACTORS.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    factors.setdefault(module, {})[which] = key
                    kinds[module] = kind
                    break
            else:
                if name.endswith(".lora_B.bias"):
                    biases[name.removesuffix(".lora_B.bias")] = key
                elif ".lora_" in name or "lora_magnitude_vector" in name:
                    raise ModelNotFoundError(
                        self.reference, f"the adapter tensor '{key}' is of a kind this engine cannot apply"
                    )
                else:
                    # a full tensor (modules_to_save, or an embedding PEFT saved whole)
                    self._replaced[name.replace(".base_layer.", ".")] = key
        r_default = float(settings.get("r", 8))
        alpha_default = float(settings.get("lora_alpha", r_default))
        rank_pattern = settings.get("rank_pattern") or {}
        alpha_pattern = settings.get("alpha_pattern") or {}
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise ModelNotFoundError(
                    self.reference, f"the adapter has only one of the two LoRA factors of '{module}'"
                )
            r = _pattern_value(rank_pattern, module, r_default)
            alpha = _pattern_value(alpha_pattern, module, alpha_default)
            if r <= 0:
                raise ModelNotFoundError(self.reference, f"rank {r} for '{module}' is not positive")
            scale = alpha / math.sqrt(r) if settings.get("use_rslora") else alpha / r
            embedding = kinds[module] == "embedding"
            rows = adapter_tensors[pair["A"]].shape[0]
            if rows != r:
                raise ModelNotFoundError(
                    self.reference,
                    f"'{pair['A']}' has rank {rows} but adapter_config.json says {r:g} for '{module}'",
                )
            self._updates[f"{module}.weight"] = LoraUpdate(
                target=f"{module}.weight",
                a=pair["A"],
                b=pair["B"],
                scale=scale,
                transpose=embedding or bool(settings.get("fan_in_fan_out")),
                bias=biases.get(module),
            )

    def _skip_tied_heads(self) -> None:
        """A head the base ties to its embedding (stores no tensor for) follows the embedding's update."""
        for head, embeddings in TIED_HEADS.items():
            if head not in self._base_tensors and any(e in self._base_tensors for e in embeddings):
                self._updates.pop(head, None)
                self._replaced.pop(head, None)

    def _check_shapes(self, adapter_tensors: Mapping[str, TensorInfo]) -> None:
        for update in self._updates.values():
            a = adapter_tensors[update.a].shape
            b = adapter_tensors[update.b].shape
            if len(a) != 2 or len(b) != 2:
                raise ModelNotFoundError(
                    self.reference, f"'{update.a}' is not a matrix: convolution LoRA is not supported"
                )
            target = self._tensors.get(update.target)
            if target is None:
                raise IncompatibleModelsError(
                    f"The adapter of '{self.reference}' updates '{update.target}', which the base "
                    f"'{self.base.reference}' does not have: the adapter was trained on another architecture.",
                    models=[self.reference],
                    field="tensor names",
                )
            shape = (a[1], b[0]) if update.transpose else (b[0], a[1])
            if b[1] != a[0] or target.shape != shape:
                raise IncompatibleModelsError(
                    f"The adapter of '{self.reference}' gives '{update.target}' an update of shape "
                    f"{list(shape)}, but the base's tensor is {list(target.shape)}: "
                    "the adapter was trained on another base model.",
                    models=[self.reference],
                    field="shape",
                )
            if update.bias is not None:
                bias = update.target.removesuffix(".weight") + ".bias"
                if bias not in self._tensors:
                    raise IncompatibleModelsError(
                        f"The adapter of '{self.reference}' updates the bias of '{bias}', "
                        "which the base model does not have.",
                        models=[self.reference],
                        field="tensor names",
                    )

    @property
    def updated(self) -> tuple[str, ...]:
        """The base tensors that get a low-rank update (weights, and biases with ``lora_bias``)."""
        return (*self._updates, *self._bias_updates)

    @property
    def replaced(self) -> tuple[str, ...]:
        """The base tensors that the adapter replaces whole."""
        return tuple(self._replaced)

    # -- ModelSource -------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        update = self._updates.get(name)
        bias_update = self._bias_updates.get(name)
        replaced = self._replaced.get(name)
        # a replaced tensor (PEFT saves the embedding whole beside its LoRA) is the update's base
        read_base = self.base if replaced is None else self.adapter
        stored_name = name if replaced is None else replaced
        if update is None and bias_update is None:
            return read_base.read(stored_name, dtype)
        stored = read_base.read(stored_name)
        merged = stored.to(torch.float64 if stored.dtype == torch.float64 else torch.float32)
        if update is not None:
            a = self.adapter.read(update.a, merged.dtype)  # [r, in]
            b = self.adapter.read(update.b, merged.dtype)  # [out, r]
            delta = b @ a  # [out, in]
            merged += update.scale * (delta.T if update.transpose else delta)
        elif bias_update is not None and bias_update.bias is not None:
            merged += bias_update.scale * self.adapter.read(bias_update.bias, merged.dtype)
        return merged.to(dtype or stored.dtype)

    def files(self) -> list[str]:
        # the merged model's side files are the base's, as with mergekit's merged copy
        return self.base.files()

    def read_file(self, relative_path: str) -> bytes:
        return self.base.read_file(relative_path)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()
