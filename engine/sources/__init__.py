"""Where tensors come from. Each source reads one tensor at a time and knows its metadata first."""

from __future__ import annotations

import os

from engine.errors import ModelNotFoundError
from engine.sources.base import ModelSource, TensorInfo
from engine.sources.local import LocalModel

__all__ = ["LocalModel", "ModelSource", "TensorInfo", "open_model"]


def open_model(reference: str, *, allow_pickle: bool = False, base_dir: str | None = None) -> ModelSource:
    """Open a model by its recipe reference.

    Args:
        reference: a path to a local model folder (relative paths resolve against ``base_dir``).
        allow_pickle: accept ``.bin`` weights when no safetensors exist.
        base_dir: a second folder relative references are tried in (the recipe's folder).

    Raises:
        ModelNotFoundError: nothing readable is at that reference.
    """
    if "+" in reference:
        raise ModelNotFoundError(
            reference, "LoRA references ('base+adapter') are not supported by this version of the engine"
        )
    path = reference.split("@", 1)[0] if "@" in reference and not os.path.exists(reference) else reference
    # Relative paths resolve against the working directory first, as in mergekit, then the recipe's folder.
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path)]
    if base_dir and not os.path.isabs(path):
        candidates.append(os.path.join(base_dir, path))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return LocalModel(reference, candidate, allow_pickle=allow_pickle)
    raise ModelNotFoundError(
        reference,
        f"no model folder at {os.path.abspath(candidates[0])}; give the path to a folder "
        "with config.json and .safetensors weights",
    )
