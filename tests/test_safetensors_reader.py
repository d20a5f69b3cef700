"""The safetensors reader: exact bytes for good files, a named refusal for hostile ones."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from engine.errors import SafetensorsFormatError
from engine.sources.safetensors_file import SafetensorsFile, parse_header


def write_raw(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_wrote_bit_for_bit(tmp_path: Path) -> None:
    tensors = {
        "a": torch.tensor([[1.5, -2.0], [3.25, 4.0]], dtype=torch.bfloat16),
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "c": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros((0, 4), dtype=torch.float16),
        "scalar": torch.tensor(7.0, dtype=torch.float32),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    file = SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        for name, expected in tensors.items():
            got = file.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)
        assert file.read("a", torch.float32).tolist() == [[1.5, -2.0], [3.25, 4.0]]
    finally:
        file.close()


def test_a_read_tensor_is_independent_of_the_file(tmp_path: Path) -> None:
    save_file({"x": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    file = SafetensorsFile(str(tmp_path / "m.safetensors"))
    x = file.read("x")
    file.close()  # must not invalidate x
    x += 1
    assert x.tolist() == [2.0] * 4


def _resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_viewed_tensor_drops_the_pages_it_is_done_with_and_still_reads_right(tmp_path: Path) -> None:
    """release_part unmaps whole pages only; what is read again comes back from the file."""
    big = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB
    save_file({"small": torch.ones(3), "big": big}, str(tmp_path / "m.safetensors"))
    file = SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        with file.view("big") as view:
            assert float(view.sum(dtype=torch.float64)) == float(
                big.sum(dtype=torch.float64)
            )  # all mapped in
            mapped = _resident_kib()
            file.release_part("big", 0, (8 << 20) - 1000)
            assert _resident_kib() < mapped - 24 * 1024  # most of the 32 MiB went
            file.release_part("big", 5, 6)  # inside one page: nothing to drop, no error
            assert torch.equal(view, big)  # read again from the page cache
        assert file.read("small").tolist() == [1.0, 1.0, 1.0]
    finally:
        file.close()


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'Q9'"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "lie outside"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        (
            {
                "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of sizes"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "lie outside"),
        ({"t": [1, 2]}, b"", "not a JSON object"),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    ],
)
def test_hostile_headers_are_refused_by_name(
    tmp_path: Path, header: dict[str, object], data: bytes, reason: str
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsFormatError, match=reason) as info:
        SafetensorsFile(str(path))
    assert str(path) in str(info.value)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="claims 10000 bytes but the file has 10"):
        SafetensorsFile(str(path))


def test_truncated_and_non_json_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(SafetensorsFormatError, match="only 2 bytes"):
        SafetensorsFile(str(short))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        SafetensorsFile(str(garbage))


def test_the_failing_tensor_is_named(tmp_path: Path) -> None:
    header = {
        "good": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "model.layers.0.mlp.weight": {"dtype": "F32", "shape": [9], "data_offsets": [4, 8]},
    }
    path = write_raw(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(SafetensorsFormatError) as info:
        SafetensorsFile(str(path))
    assert info.value.tensor == "model.layers.0.mlp.weight"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), size=st.integers(min_value=0, max_value=10_000))
def test_fuzz_arbitrary_header_bytes(raw: bytes, size: int) -> None:
    try:
        header = parse_header(raw, 8 + len(raw) + size, "fuzz.safetensors")
    except SafetensorsFormatError:
        return
    for entry in header.entries.values():
        assert header.data_start <= entry.start <= entry.end <= 8 + len(raw) + size


_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "X", 3]),
        "shape": st.lists(st.integers(min_value=-2, max_value=5), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-4, max_value=200), min_size=0, max_size=3),
    }
)


@settings(max_examples=300, deadline=None)
@given(entries=st.dictionaries(st.text(min_size=1, max_size=8), _entry, max_size=4), size=st.integers(0, 256))
def test_fuzz_structured_headers(entries: dict[str, dict[str, object]], size: int) -> None:
    raw = json.dumps(entries).encode()
    try:
        header = parse_header(raw, 8 + len(raw) + size, "fuzz.safetensors")
    except SafetensorsFormatError:
        return
    spans = sorted((e.start, e.end) for e in header.entries.values() if e.nbytes)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # accepted files never alias bytes
