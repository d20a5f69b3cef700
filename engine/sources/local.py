"""A model in a local folder: one or many safetensors shards, read through memory maps."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from engine.errors import ModelNotFoundError, SafetensorsFormatError, UnsafeWeightsError
from engine.sources.base import TensorInfo
from engine.sources.safetensors_file import DTYPES, TORCH_TO_CODE, SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class LocalModel:
    """Tensors and files of a model folder; pickled weights only when explicitly allowed."""

    def __init__(self, reference: str, path: str, *, allow_pickle: bool = False) -> None:
        self.reference = reference
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise ModelNotFoundError(reference, f"there is no folder at {self.path}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._config: dict[str, Any] | None = None
        self._open_weights(allow_pickle)

    def _open_weights(self, allow_pickle: bool) -> None:
        names = sorted(os.listdir(self.path))
        index_path = os.path.join(self.path, SAFETENSORS_INDEX)
        if os.path.exists(index_path):
            shard_names = self._shards_from_index(index_path)
        else:
            shard_names = [n for n in names if n.endswith(".safetensors")]
        if shard_names:
            for shard in shard_names:
                file = SafetensorsFile(os.path.join(self.path, shard))
                self._files[shard] = file
                for tensor in file.entries:
                    if tensor in self._where:
                        raise SafetensorsFormatError(
                            file.path, f"also stored in {self._where[tensor].path}", tensor=tensor
                        )
                    self._where[tensor] = file
            return
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickled and not allow_pickle:
            raise UnsafeWeightsError(self.reference, pickled)
        if pickled:
            self._load_pickled(pickled)
            return
        raise ModelNotFoundError(self.reference, f"no .safetensors weights in {self.path}")

    def _shards_from_index(self, index_path: str) -> list[str]:
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SafetensorsFormatError(index_path, f"not a valid shard index ({exc})") from None
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise SafetensorsFormatError(index_path, f"shard name {shard!r} is not a file in the folder")
            if not os.path.exists(os.path.join(self.path, shard)):
                raise SafetensorsFormatError(index_path, f"names shard {shard} which is missing")
        return shards

    def _load_pickled(self, files: list[str]) -> None:
        # weights_only refuses arbitrary objects: even an allowed pickle cannot run code.
        self._pickled = {}
        for name in files:
            state = torch.load(
                os.path.join(self.path, name), map_location="cpu", weights_only=True, mmap=True
            )
            if not isinstance(state, dict):
                raise SafetensorsFormatError(name, "the pickle does not hold a state dict")
            self._pickled.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})

    def config(self) -> dict[str, Any]:
        if self._config is None:
            path = os.path.join(self.path, "config.json")
            if not os.path.exists(path):
                raise ModelNotFoundError(self.reference, f"no config.json in {self.path}")
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = json.load(f)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(self.reference, f"config.json is not valid JSON ({exc})") from None
            if not isinstance(loaded, dict):
                raise ModelNotFoundError(self.reference, "config.json is not a JSON object")
            self._config = loaded
        return dict(self._config)

    def tensors(self) -> dict[str, TensorInfo]:
        if self._pickled is not None:
            out = {}
            for name, t in self._pickled.items():
                code = TORCH_TO_CODE.get(t.dtype)
                if code is None:
                    raise SafetensorsFormatError(name, f"unsupported dtype {t.dtype}")
                out[name] = TensorInfo(code, tuple(t.shape), t.numel() * DTYPES[code][1])
            return out
        return {
            name: TensorInfo(entry.dtype, entry.shape, entry.nbytes)
            for file in self._files.values()
            for name, entry in sorted(file.entries.items(), key=lambda kv: kv[1].start)
        }

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._pickled is not None:
            t = self._pickled[name]
            return t.to(dtype or t.dtype, copy=True)
        return self._where[name].read(name, dtype)

    @contextmanager
    def view(self, name: str) -> Iterator[torch.Tensor]:
        """The stored tensor without a copy (read-only), valid inside the block."""
        if self._pickled is not None:
            yield self._pickled[name]
            return
        with self._where[name].view(name) as tensor:
            yield tensor

    def release_part(self, name: str, first: int, last: int) -> None:
        """Drop the mapped pages of elements ``[first, last)`` of a viewed tensor (see ``SafetensorsFile``)."""
        if self._pickled is None:
            self._where[name].release_part(name, first, last)

    def files(self) -> list[str]:
        out = []
        for root, dirs, names in os.walk(self.path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for n in names:
                rel = os.path.relpath(os.path.join(root, n), self.path)
                if not n.endswith((".safetensors", *PICKLE_SUFFIXES)) and n != SAFETENSORS_INDEX:
                    out.append(rel)
        return sorted(out)

    def read_file(self, relative_path: str) -> bytes:
        with open(os.path.join(self.path, relative_path), "rb") as f:
            return f.read()

    def close(self) -> None:
        for file in self._files.values():
            file.close()
