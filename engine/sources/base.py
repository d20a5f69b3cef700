"""What the engine needs from a model, wherever its tensors live."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's stored dtype (safetensors code) and shape, known before it is read."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ModelSource(Protocol):
    """A model's metadata and tensors, read one tensor at a time."""

    reference: str

    def config(self) -> dict[str, Any]:
        """The model's config.json as a plain dict (never through remote code)."""
        ...

    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor name with its dtype and shape, in file order."""
        ...

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as a fresh CPU tensor, converted to ``dtype`` if given."""
        ...

    def files(self) -> list[str]:
        """Relative paths of the non-weight files (tokenizer, generation config...)."""
        ...

    def read_file(self, relative_path: str) -> bytes: ...

    def close(self) -> None: ...
