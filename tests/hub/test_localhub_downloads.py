"""Downloads: hf_hub_download, snapshot_download, safetensors metadata, HfFileSystem ranges, errors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session, sha
from safetensors.numpy import save

WEIGHTS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b.bias": np.ones(5, dtype=np.float16)}


@pytest.fixture(scope="module")
def model(alice: HfApi) -> tuple[str, bytes, bytes]:
    """A repo with a regular file, an LFS safetensors file and a nested file."""
    repo_id = "acme/download-me"
    alice.create_repo(repo_id, exist_ok=True)
    config = b'{"model_type": "llama"}\n'
    weights = save(WEIGHTS, metadata={"format": "np"}) + b""
    alice.create_commit(
        repo_id,
        [
            CommitOperationAdd("config.json", config),
            CommitOperationAdd("model.safetensors", weights),
            CommitOperationAdd("sub/dir/notes.txt", b"nested"),
        ],
        commit_message="weights",
    )
    return repo_id, config, weights


def test_hf_hub_download_regular_and_lfs(
    model: tuple[str, bytes, bytes], alice: HfApi, cache_dir: Path
) -> None:
    repo_id, config, weights = model
    path = hf_hub_download(repo_id, "config.json", endpoint=alice.endpoint, cache_dir=cache_dir)
    assert Path(path).read_bytes() == config
    path = hf_hub_download(repo_id, "model.safetensors", endpoint=alice.endpoint, cache_dir=cache_dir)
    assert Path(path).read_bytes() == weights
    head = alice.model_info(repo_id).sha
    assert head is not None and f"snapshots/{head}/" in path
    again = hf_hub_download(
        repo_id, "model.safetensors", revision=head, endpoint=alice.endpoint, cache_dir=cache_dir
    )
    assert again == path


def test_metadata_headers(model: tuple[str, bytes, bytes], alice: HfApi) -> None:
    repo_id, config, weights = model
    head = alice.model_info(repo_id).sha
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "config.json", endpoint=alice.endpoint))
    assert meta.commit_hash == head and meta.etag == sha.git_hash(config) and meta.size == len(config)
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "model.safetensors", endpoint=alice.endpoint))
    assert meta.etag == hashlib.sha256(weights).hexdigest() and meta.size == len(weights)
    response = get_session().head(hf_hub_url(repo_id, "model.safetensors", endpoint=alice.endpoint))
    assert response.headers["X-Linked-Size"] == str(len(weights))
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert response.headers["Accept-Ranges"] == "bytes"


def test_range_requests(model: tuple[str, bytes, bytes], alice: HfApi) -> None:
    repo_id, _, weights = model
    url = hf_hub_url(repo_id, "model.safetensors", endpoint=alice.endpoint)
    response = get_session().get(url, headers={"Range": "bytes=8-19"})
    assert response.status_code == 206
    assert response.content == weights[8:20]
    assert response.headers["Content-Range"] == f"bytes 8-19/{len(weights)}"


def test_snapshot_download(
    model: tuple[str, bytes, bytes], alice: HfApi, cache_dir: Path, tmp_path: Path
) -> None:
    repo_id, config, _ = model
    folder = Path(snapshot_download(repo_id, endpoint=alice.endpoint, cache_dir=cache_dir))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub/dir/notes.txt",
    ]
    local = Path(
        snapshot_download(
            repo_id, endpoint=alice.endpoint, local_dir=tmp_path / "local", allow_patterns=["*.json"]
        )
    )
    assert (local / "config.json").read_bytes() == config and not (local / "model.safetensors").exists()


def test_safetensors_metadata(model: tuple[str, bytes, bytes], alice: HfApi) -> None:
    repo_id, _, _ = model
    meta = alice.get_safetensors_metadata(repo_id)
    assert meta.sharded is False
    info = meta.files_metadata["model.safetensors"]
    assert info.tensors["a.weight"].shape == [3, 4] and info.tensors["a.weight"].dtype == "F32"
    assert info.tensors["b.bias"].dtype == "F16" and info.metadata == {"format": "np"}
    assert meta.parameter_count == {"F32": 12, "F16": 5}


def test_hf_file_system_range_reads(model: tuple[str, bytes, bytes], alice: HfApi) -> None:
    repo_id, _, weights = model
    fs = HfFileSystem(endpoint=alice.endpoint, token=alice.token, skip_instance_cache=True)
    assert fs.size(f"{repo_id}/model.safetensors") == len(weights)
    assert sorted(fs.ls(repo_id, detail=False)) == sorted(
        f"{repo_id}/{name}" for name in (".gitattributes", "config.json", "model.safetensors", "sub")
    )
    with fs.open(f"{repo_id}/model.safetensors", "rb", block_size=16) as f:
        f.seek(10)
        assert f.read(20) == weights[10:30]
        f.seek(len(weights) - 5)
        assert f.read(100) == weights[-5:]
    with fs.open(f"{repo_id}/model.safetensors", "rb", block_size=0) as f:  # streaming mode
        assert f.read(9) == weights[:9]
        assert f.read() == weights[9:]
    assert fs.cat_file(f"{repo_id}/sub/dir/notes.txt", start=1, end=4) == b"est"


def test_download_errors(model: tuple[str, bytes, bytes], alice: HfApi, cache_dir: Path) -> None:
    repo_id, _, _ = model
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/nothing-here", "config.json", endpoint=alice.endpoint, cache_dir=cache_dir)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="v9", endpoint=alice.endpoint, cache_dir=cache_dir)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin", endpoint=alice.endpoint, cache_dir=cache_dir)
    assert alice.file_exists(repo_id, "config.json") and not alice.file_exists(repo_id, "missing.bin")
    response = get_session().get(f"{alice.endpoint}/{repo_id}/resolve/main/..%2F..%2Fhub.sqlite")
    assert response.status_code == 400


def test_datasets_resolve_under_their_prefix(
    alice: HfApi, repo_name: Callable[[str], str], cache_dir: Path
) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id, repo_type="dataset")
    data = os.urandom(1000)
    alice.upload_file(
        path_or_fileobj=data, path_in_repo="train.parquet", repo_id=repo_id, repo_type="dataset"
    )
    path = hf_hub_download(
        repo_id, "train.parquet", repo_type="dataset", endpoint=alice.endpoint, cache_dir=cache_dir
    )
    assert Path(path).read_bytes() == data
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "train.parquet", endpoint=alice.endpoint, cache_dir=cache_dir)


def test_spaces_resolve_under_their_prefix(
    alice: HfApi, repo_name: Callable[[str], str], cache_dir: Path
) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id, repo_type="space", space_sdk="static")
    alice.upload_file(
        path_or_fileobj=b"<h1>hi</h1>", path_in_repo="index.html", repo_id=repo_id, repo_type="space"
    )
    path = hf_hub_download(
        repo_id, "index.html", repo_type="space", endpoint=alice.endpoint, cache_dir=cache_dir
    )
    assert Path(path).read_bytes() == b"<h1>hi</h1>"


def test_repo_page_lists_files_and_readme(model: tuple[str, bytes, bytes], alice: HfApi) -> None:
    """Links to <endpoint>/<org>/<name> (the Space's queue, the bot's replies) open a readable page."""
    repo_id, _, _ = model
    alice.upload_file(
        path_or_fileobj=b"---\nlicense: mit\n---\n# Download me <script>\n",
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    page = get_session().get(f"{alice.endpoint}/{repo_id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "acme/download-me" in html and "<b>mit</b>" in html
    assert f"{alice.endpoint}/{repo_id}/resolve/" in html and "model.safetensors" in html
    assert "# Download me &lt;script&gt;" in html  # README shown as text, escaped
    missing = get_session().get(f"{alice.endpoint}/acme/no-such-repo")
    assert missing.status_code == 404
