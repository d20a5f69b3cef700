"""Sharded safetensors output, written as tensors are produced.

The plan knows every output tensor's name, dtype and shape before the first one is
computed, so each shard's header (and so every tensor's final byte offset) is fixed up
front. A finished tensor goes straight to its offset and is freed; nothing accumulates.
Because the layout comes from the plan and not from arrival order, the bytes are the same
whatever order tensors are computed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from engine.sources.safetensors_file import DTYPES, TORCH_TO_CODE

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default (`--out-shard-size 5B`)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file


class ShardedWriter:
    """Writes planned tensors into ``model-XXXXX-of-YYYYY.safetensors`` files plus the index."""

    def __init__(
        self,
        folder: str,
        tensors: Sequence[OutputTensor],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        on_shard: Callable[[str], None] | None = None,
    ):
        """``on_shard(path)`` is called as each shard file is complete (e.g. to upload it early)."""
        self.folder = folder
        self._on_shard = on_shard
        self._tensors = {t.name: t for t in tensors}
        shards: list[list[OutputTensor]] = [[]]
        size = 0
        for tensor in tensors:
            if shards[-1] and max_shard_bytes > 0 and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        total = len(shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._slots: dict[str, _Slot] = {}
        self._headers: list[bytes] = []
        self._remaining: list[int] = []
        for index, members in enumerate(shards):
            header, offsets = _layout(members)
            self._headers.append(header)
            self._remaining.append(len(members))
            for name, offset in offsets.items():
                self._slots[name] = _Slot(index, offset)
        self._handles: dict[int, BinaryIO] = {}
        self.total_bytes = sum(t.nbytes for t in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one finished tensor at its planned place (any order; each name once)."""
        planned = self._tensors[name]
        if TORCH_TO_CODE[tensor.dtype] != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {planned}")
        slot = self._slots[name]
        handle = self._handle(slot.shard)
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            handle.seek(slot.offset)
            raw: Any = data.reshape(-1).view(torch.uint8).numpy()  # written in place, no copy
            handle.write(raw)
        self._remaining[slot.shard] -= 1
        if self._remaining[slot.shard] == 0:
            handle.close()
            del self._handles[slot.shard]
            if self._on_shard is not None:
                self._on_shard(os.path.join(self.folder, self.shard_names[slot.shard]))

    def _handle(self, shard: int) -> BinaryIO:
        if shard not in self._handles:
            path = os.path.join(self.folder, self.shard_names[shard])
            f = open(path, "wb")  # noqa: SIM115 - closed when its last tensor lands
            f.write(self._headers[shard])
            self._handles[shard] = f
        return self._handles[shard]

    def finish(self) -> None:
        """Check every tensor was written and write the index."""
        missing = [i for i, n in enumerate(self._remaining) if n]
        if missing:
            raise RuntimeError(f"shards {missing} are incomplete")
        weight_map = {name: self.shard_names[slot.shard] for name, slot in self._slots.items()}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def abort(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _layout(members: Sequence[OutputTensor]) -> tuple[bytes, dict[str, int]]:
    """The header bytes of one shard and the absolute offset of each tensor in it.

    Tensors with wider elements come first so every tensor starts aligned to its element
    size (readers may map them in place); the data region is contiguous, as the format requires.
    """
    ordered = sorted(members, key=lambda t: -DTYPES[t.dtype][1])
    entries: dict[str, dict[str, object]] = {"__metadata__": {"format": "pt"}}
    relative: dict[str, int] = {}
    position = 0
    for t in ordered:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        relative[t.name] = position
        position += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    header = len(raw).to_bytes(8, "little") + raw
    return header, {name: len(header) + off for name, off in relative.items()}
