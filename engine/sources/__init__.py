"""Where tensors come from. Each source reads one tensor at a time and knows its metadata first."""

from __future__ import annotations

import os

from engine.errors import ModelNotFoundError
from engine.sources.base import ModelSource, TensorInfo
from engine.sources.hub import parse_hub_reference
from engine.sources.local import LocalModel
from engine.sources.lora import LoraModel, split_reference

__all__ = ["LocalModel", "LoraModel", "ModelSource", "TensorInfo", "open_model"]


def open_model(
    reference: str,
    *,
    allow_pickle: bool = False,
    base_dir: str | None = None,
    hub_endpoint: str | None = None,
    hub_token: str | None = None,
) -> ModelSource:
    """Open a model by its recipe reference.

    Args:
        reference: a local model folder, or a Hub repo id (``org/name`` or ``org/name@revision``)
            when no such folder exists; ``base+adapter`` (mergekit's syntax) applies a PEFT LoRA
            adapter (a folder or a Hub id) to the base on the fly.
        allow_pickle: accept ``.bin`` weights when no safetensors exist.
        base_dir: a second folder relative references are tried in (the recipe's folder).
        hub_endpoint, hub_token: where Hub ids are read from; None follows huggingface_hub's defaults.

    Raises:
        ModelNotFoundError: nothing readable is at that reference.
    """
    parts = split_reference(reference) if not _is_folder(reference, base_dir) else None
    if parts is not None:
        return _open_lora(reference, parts, allow_pickle, base_dir, hub_endpoint, hub_token)
    path = reference
    # Relative paths resolve against the working directory first, as in mergekit, then the recipe's folder.
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path)]
    if base_dir and not os.path.isabs(path):
        candidates.append(os.path.join(base_dir, path))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return LocalModel(reference, candidate, allow_pickle=allow_pickle)
    hub = parse_hub_reference(reference)
    if hub is not None and not reference.startswith((".", "/")):
        from engine.sources.hub import HubModel

        return HubModel(reference, hub[0], hub[1], endpoint=hub_endpoint, token=hub_token)
    raise ModelNotFoundError(
        reference,
        f"no model folder at {os.path.abspath(candidates[0])}, and it is not a Hub id (org/name); "
        "give a folder with config.json and .safetensors weights, or a Hub repo id",
    )


def _is_folder(reference: str, base_dir: str | None) -> bool:
    """A folder whose name holds a '+' is a folder, not a LoRA reference."""
    if os.path.isdir(reference):
        return True
    return (
        bool(base_dir)
        and not os.path.isabs(reference)
        and os.path.isdir(os.path.join(base_dir or "", reference))
    )


def _open_lora(
    reference: str,
    parts: tuple[str, str],
    allow_pickle: bool,
    base_dir: str | None,
    hub_endpoint: str | None,
    hub_token: str | None,
) -> ModelSource:
    opened: list[ModelSource] = []
    try:
        for part in parts:
            opened.append(
                open_model(
                    part,
                    allow_pickle=allow_pickle,
                    base_dir=base_dir,
                    hub_endpoint=hub_endpoint,
                    hub_token=hub_token,
                )
            )
        return LoraModel(reference, opened[0], opened[1])
    except BaseException:
        for source in opened:
            source.close()
        raise
