"""A strict reader for one safetensors file: the header is validated before any tensor is touched.

We parse the header ourselves rather than trusting a library's error text because a
hostile file (a header length beyond the end, offsets outside the data, overlapping
tensors, unknown dtypes) must be refused with a message that names the file and the
tensor. Tensor data is read through one read-only memory map per file; after a tensor
has been consumed its pages are dropped from the process (``MADV_DONTNEED``), so the
resident memory of a merge does not grow with the size of the model.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from engine import buffers
from engine.errors import SafetensorsFormatError

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: Mapping[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_CODE: Mapping[torch.dtype, str] = {dt: code for code, (dt, _) in DTYPES.items()}

# The format caps the header at 100 MB; a larger claim is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a file: absolute byte range, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    data_start: int


def parse_header(raw: bytes, file_size: int, path: str) -> SafetensorsHeader:
    """Validate a header (the bytes after the 8-byte length prefix) against the file size.

    Raises:
        SafetensorsFormatError: naming the first problem found and, where it applies, the tensor.
    """
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(path, "the header is not a JSON object")

    metadata: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    data_size = file_size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise SafetensorsFormatError(path, "__metadata__ must map strings to strings")
            metadata = dict(info)
            continue
        entries[name] = _parse_entry(name, info, data_start, data_size, path)

    # Overlapping tensors would alias each other's bytes: a hostile trick, never a real file.
    ordered = sorted(entries.values(), key=lambda e: (e.start, e.end))
    for previous, current in itertools.pairwise(ordered):
        if current.start < previous.end and current.nbytes and previous.nbytes:
            raise SafetensorsFormatError(
                path, f"its bytes overlap those of tensor '{previous.name}'", tensor=current.name
            )
    return SafetensorsHeader(entries=entries, metadata=metadata, data_start=data_start)


def _parse_entry(name: str, info: Any, data_start: int, data_size: int, path: str) -> TensorEntry:
    if not isinstance(info, dict):
        raise SafetensorsFormatError(path, "entry is not a JSON object", tensor=name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        known = ", ".join(DTYPES)
        raise SafetensorsFormatError(path, f"unknown dtype {dtype!r} (known: {known})", tensor=name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsFormatError(path, f"shape {shape!r} is not a list of sizes", tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsFormatError(path, f"data_offsets {offsets!r} is not [begin, end]", tensor=name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SafetensorsFormatError(
            path, f"data_offsets [{begin}, {end}] lie outside the {data_size} bytes of data", tensor=name
        )
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise SafetensorsFormatError(
            path,
            f"shape {shape} in {dtype} needs {expected} bytes but data_offsets span {end - begin}",
            tensor=name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header_from_file(path: str) -> SafetensorsHeader:
    """Read and validate the header of a local file without touching tensor data."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsFormatError(path, f"the file is only {len(prefix)} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise SafetensorsFormatError(
                    path, f"the header claims {header_len} bytes but the file has {file_size}"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise SafetensorsFormatError(path, f"cannot be read ({exc.strerror})") from None
    return parse_header(raw, file_size, path)


class SafetensorsFile:
    """One local safetensors file, read tensor by tensor through a memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.header = read_header_from_file(path)
        self._file: Any = None
        self._map: mmap.mmap | None = None

    @property
    def entries(self) -> Mapping[str, TensorEntry]:
        return self.header.entries

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - lives as long as the map
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return the tensor as a fresh CPU tensor, converted to ``dtype`` in the same pass.

        The bytes are viewed in place in the map and copied once (the conversion is the
        copy), then the tensor's pages are released.
        """
        entry = self.header.entries[name]
        stored = entry.torch_dtype
        target = dtype or stored
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=target)
        with warnings.catch_warnings():
            # The map is read-only; torch warns that the view is not writable. We never
            # write through it: the view is copied on the next line and dropped.
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._mapping(), dtype=stored, count=entry.numel, offset=entry.start)
        out = buffers.empty(entry.shape, target)
        out.reshape(-1).copy_(view)
        del view
        self.release(entry)
        return out

    @contextmanager
    def view(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor in place in the map (stored dtype, read-only), for the duration of a block.

        Nothing is copied: callers convert slices as they go, so a tensor never exists as a
        whole in the compute dtype. Its pages are released when the block ends.
        """
        entry = self.header.entries[name]
        if entry.numel == 0:
            yield torch.empty(entry.shape, dtype=entry.torch_dtype)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only map: we never write through it
            view = torch.frombuffer(
                self._mapping(), dtype=entry.torch_dtype, count=entry.numel, offset=entry.start
            )
        try:
            yield view.reshape(entry.shape)
        finally:
            del view
            self.release(entry)

    def release(self, entry: TensorEntry) -> None:
        """Drop the pages of one tensor from this process (they stay in the page cache)."""
        if self._map is None or entry.nbytes == 0:
            return
        start = (entry.start // _PAGE) * _PAGE
        self._map.madvise(mmap.MADV_DONTNEED, start, entry.end - start)

    def release_part(self, name: str, first: int, last: int) -> None:
        """Drop the pages that lie wholly inside elements ``[first, last)`` of a viewed tensor.

        A merge that streams a tensor calls it for the parts it is done with, so a large
        tensor's inputs do not all stay mapped in until its end. Pages are read-only maps of
        the file: one dropped too early is only read again from the page cache.
        """
        entry = self.header.entries[name]
        if self._map is None or last <= first:
            return
        size = DTYPES[entry.dtype][1]
        start = -(-(entry.start + first * size) // _PAGE) * _PAGE
        end = ((entry.start + last * size) // _PAGE) * _PAGE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
