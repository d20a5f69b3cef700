"""A model in a Hub repo, read tensor by tensor with HTTP range requests.

Only the safetensors headers are fetched up front; each tensor is then fetched as exactly
its own byte range when the merge needs it, so merging Hub models uses no disk beyond the
output and never downloads whole files. The repo is pinned to one commit when opened, so a
push to the repo during a merge cannot mix two revisions.

All traffic goes through ``huggingface_hub`` (``HfApi`` for metadata, ``HfFileSystem`` for
ranges), so the endpoint and token follow its usual rules or are passed explicitly.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from typing import Any

import torch

from engine.errors import ModelNotFoundError, SafetensorsFormatError, UnsafeWeightsError
from engine.sources.base import TensorInfo
from engine.sources.local import PICKLE_SUFFIXES, SAFETENSORS_INDEX
from engine.sources.safetensors_file import MAX_HEADER_BYTES, TensorEntry, parse_header

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def parse_hub_reference(reference: str) -> tuple[str, str | None] | None:
    """``org/name`` or ``org/name@revision`` -> (repo_id, revision); None if it is not a Hub id."""
    repo, _, revision = reference.partition("@")
    if not REPO_ID.match(repo) or ".." in repo:
        return None
    return repo, revision or None


class HubModel:
    """Tensors and files of a Hub repo at a pinned commit."""

    def __init__(
        self, reference: str, repo_id: str, revision: str | None, *, endpoint: str | None, token: str | None
    ):
        from huggingface_hub import HfApi, HfFileSystem
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        self.reference = reference
        self.repo_id = repo_id
        self._api = HfApi(endpoint=endpoint, token=token)
        try:
            info = self._api.model_info(repo_id, revision=revision, files_metadata=True)
        except GatedRepoError:
            raise ModelNotFoundError(
                reference, "the repo is gated: accept its terms on the Hub and use a token"
            ) from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(reference, f"the repo has no revision '{revision}'") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                reference, "no such repo on the Hub (or it is private and the token cannot read it)"
            ) from None
        except HfHubHTTPError as exc:
            raise ModelNotFoundError(reference, f"the Hub answered {exc.response.status_code}") from None
        except Exception as exc:  # connection refused, DNS, TLS, timeouts: whatever the HTTP stack raises
            raise ModelNotFoundError(
                reference, f"the Hub could not be reached ({type(exc).__name__}: {exc})"
            ) from None
        self.revision: str = info.sha or (revision or "main")
        self._sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
        self._fs = HfFileSystem(endpoint=endpoint, token=token)
        self._lock = threading.Lock()
        self.bytes_fetched = 0
        self._handles: dict[str, Any] = {}
        self._config: dict[str, Any] | None = None
        self._entries: dict[str, TensorEntry] = {}
        self._where: dict[str, str] = {}
        self._open_weights()

    # -- metadata -------------------------------------------------------------------------

    def _open_weights(self) -> None:
        names = sorted(self._sizes)
        if SAFETENSORS_INDEX in self._sizes:
            try:
                weight_map = json.loads(self._fetch_file(SAFETENSORS_INDEX))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SafetensorsFormatError(
                    f"{self.reference}/{SAFETENSORS_INDEX}", f"not a valid index ({exc})"
                ) from None
        else:
            shards = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        if not shards:
            pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
            if pickled:
                raise UnsafeWeightsError(self.reference, pickled)
            raise ModelNotFoundError(self.reference, "the repo has no .safetensors weights")
        for shard in shards:
            if shard not in self._sizes:
                raise SafetensorsFormatError(
                    f"{self.reference}/{SAFETENSORS_INDEX}", f"names shard {shard} which is missing"
                )
            for name, entry in self._read_header(shard).items():
                if name in self._where:
                    raise SafetensorsFormatError(
                        f"{self.reference}/{shard}", f"also stored in {self._where[name]}", tensor=name
                    )
                self._entries[name] = entry
                self._where[name] = shard

    def _read_header(self, shard: str) -> dict[str, TensorEntry]:
        size = self._sizes[shard]
        where = f"{self.reference}/{shard}"
        if size < 8:
            raise SafetensorsFormatError(where, f"the file is only {size} bytes long")
        (length,) = struct.unpack("<Q", self._fetch(shard, 0, 8))
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SafetensorsFormatError(where, f"the header claims {length} bytes but the file has {size}")
        return dict(parse_header(self._fetch(shard, 8, 8 + length), size, where).entries)

    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = self._fetch_config()
        return dict(self._config)

    def _fetch_config(self) -> dict[str, Any]:
        if "config.json" not in self._sizes:
            raise ModelNotFoundError(self.reference, "the repo has no config.json")
        try:
            loaded = json.loads(self._fetch_file("config.json"))
        except ValueError as exc:
            raise ModelNotFoundError(self.reference, f"config.json is not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ModelNotFoundError(self.reference, "config.json is not a JSON object")
        return loaded

    def tensors(self) -> dict[str, TensorInfo]:
        ordered = sorted(self._entries.values(), key=lambda e: (self._where[e.name], e.start))
        return {e.name: TensorInfo(e.dtype, e.shape, e.nbytes) for e in ordered}

    def files(self) -> list[str]:
        return sorted(
            n
            for n in self._sizes
            if not n.endswith((".safetensors", *PICKLE_SUFFIXES)) and n != SAFETENSORS_INDEX
        )

    def read_file(self, relative_path: str) -> bytes:
        return self._fetch_file(relative_path)

    # -- data -----------------------------------------------------------------------------

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        entry = self._entries[name]
        target = dtype or entry.torch_dtype
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=target)
        raw = bytearray(self._fetch(self._where[name], entry.start, entry.end))
        flat = torch.frombuffer(raw, dtype=entry.torch_dtype)
        return (
            flat.to(target).reshape(entry.shape) if target != entry.torch_dtype else flat.reshape(entry.shape)
        )

    def _fetch(self, path: str, start: int, end: int) -> bytes:
        """Exactly bytes [start, end) of one file, as one range request (no read-ahead cache)."""
        with self._lock:
            try:
                handle = self._handles.get(path)
                if handle is None:
                    handle = self._fs.open(
                        f"{self.repo_id}/{path}", "rb", revision=self.revision, cache_type="none"
                    )
                    self._handles[path] = handle
                handle.seek(start)
                data: bytes = handle.read(end - start)
            except Exception as exc:  # HTTP or connection failure mid-merge: name the file, not a traceback
                raise ModelNotFoundError(
                    self.reference, f"reading {path} from the Hub failed ({type(exc).__name__}: {exc})"
                ) from None
            self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise SafetensorsFormatError(
                f"{self.reference}/{path}", f"expected {end - start} bytes at {start}, got {len(data)}"
            )
        return data

    def _fetch_file(self, path: str) -> bytes:
        return self._fetch(path, 0, self._sizes[path]) if self._sizes.get(path) else b""

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()
