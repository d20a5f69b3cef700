"""Where tensors come from. Each source reads one tensor at a time and knows its metadata first."""

from __future__ import annotations

import os

from engine.errors import ModelNotFoundError
from engine.sources.base import ModelSource, TensorInfo
from engine.sources.hub import parse_hub_reference
from engine.sources.local import LocalModel

__all__ = ["LocalModel", "ModelSource", "TensorInfo", "open_model"]


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
            when no such folder exists.
        allow_pickle: accept ``.bin`` weights when no safetensors exist.
        base_dir: a second folder relative references are tried in (the recipe's folder).
        hub_endpoint, hub_token: where Hub ids are read from; None follows huggingface_hub's defaults.

    Raises:
        ModelNotFoundError: nothing readable is at that reference.
    """
    if "+" in reference and not os.path.isdir(reference):
        raise ModelNotFoundError(
            reference, "LoRA references ('base+adapter') are not supported by this version of the engine"
        )
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
