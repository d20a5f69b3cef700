"""The commit protocol: preupload, LFS (basic and multipart), NDJSON commits, PRs, branches, atomicity."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RevisionNotFoundError,
)
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
from huggingface_hub.utils import get_session, sha

from localhub.server import LocalHubServer
from localhub.testing import run_localhub


@pytest.fixture
def repo(alice: HfApi, repo_name: Callable[[str], str]) -> str:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    return repo_id


def _files(api: HfApi, repo_id: str, revision: str | None = None) -> dict[str, RepoFile]:
    return {
        f.path: f
        for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }


def test_regular_and_lfs_files_get_git_oids(alice: HfApi, repo: str) -> None:
    text = b"hello localhub\n"
    weights = os.urandom(300_000)
    alice.create_commit(
        repo,
        [CommitOperationAdd("notes/hello.txt", text), CommitOperationAdd("model.safetensors", weights)],
        commit_message="add two files",
    )
    files = _files(alice, repo)
    assert files["notes/hello.txt"].blob_id == sha.git_hash(text)  # the oid git itself would compute
    assert files["notes/hello.txt"].lfs is None
    lfs = files["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.size == 300_000
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs.sha256}\nsize 300000\n".encode()
    assert files["model.safetensors"].blob_id == sha.git_hash(pointer) and lfs.pointer_size == len(pointer)


def test_big_text_file_goes_through_lfs_and_binary_samples_too(alice: HfApi, repo: str) -> None:
    alice.upload_file(path_or_fileobj=b"\0binary" * 10, path_in_repo="blob.dat", repo_id=repo)
    assert _files(alice, repo)["blob.dat"].lfs is not None


def test_multipart_upload(alice: HfApi, repo: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(2_500_000)  # above the session server's 2 MB multipart threshold: 4 parts of 800 kB
    big.write_bytes(data)
    alice.upload_file(path_or_fileobj=str(big), path_in_repo="big.bin", repo_id=repo)
    entry = _files(alice, repo)["big.bin"]
    assert entry.size == len(data)
    assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
    content = get_session().get(f"{alice.endpoint}/{repo}/resolve/main/big.bin").content
    assert content == data


def test_unchanged_files_make_no_commit(alice: HfApi, repo: str) -> None:
    first = alice.upload_file(path_or_fileobj=b"same", path_in_repo="same.txt", repo_id=repo)
    second = alice.upload_file(path_or_fileobj=b"same", path_in_repo="same.txt", repo_id=repo)
    assert first.oid == second.oid
    alice.upload_file(path_or_fileobj=b"\0lfs-same", path_in_repo="same.bin", repo_id=repo)
    head = alice.model_info(repo).sha
    again = alice.upload_file(path_or_fileobj=b"\0lfs-same", path_in_repo="same.bin", repo_id=repo)
    assert again.oid == head


def test_upload_folder_delete_file_and_folder(alice: HfApi, repo: str, tmp_path: Path) -> None:
    folder = tmp_path / "up"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "sub" / "deep" / "c.txt").write_text("c")
    alice.upload_folder(folder_path=folder, repo_id=repo)
    assert {"a.txt", "sub/b.txt", "sub/deep/c.txt"} <= set(alice.list_repo_files(repo))
    alice.delete_file("a.txt", repo_id=repo)
    alice.delete_folder("sub/deep", repo_id=repo)
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "sub/b.txt"]
    with pytest.raises(EntryNotFoundError):
        alice.delete_file("a.txt", repo_id=repo)


def test_copy_operation(alice: HfApi, repo: str) -> None:
    alice.create_commit(
        repo,
        [CommitOperationAdd("w.safetensors", b"\0" * 1000), CommitOperationAdd("r.txt", b"regular")],
        commit_message="add",
    )
    alice.create_commit(
        repo,
        [
            CommitOperationCopy("w.safetensors", "copy/w.safetensors"),
            CommitOperationCopy("r.txt", "copy/r.txt"),
        ],
        commit_message="copy",
    )
    files = _files(alice, repo)
    assert files["copy/w.safetensors"].lfs == files["w.safetensors"].lfs
    assert files["copy/r.txt"].blob_id == files["r.txt"].blob_id


def test_parent_commit_mismatch_is_412(alice: HfApi, repo: str) -> None:
    base = alice.model_info(repo).sha
    assert base is not None
    alice.create_commit(repo, [CommitOperationAdd("one.txt", b"1")], commit_message="one", parent_commit=base)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_commit(
            repo, [CommitOperationAdd("two.txt", b"2")], commit_message="two", parent_commit=base
        )
    assert err.value.response.status_code == 412
    assert "two.txt" not in alice.list_repo_files(repo)


def test_failed_commit_changes_nothing(alice: HfApi, repo: str) -> None:
    alice.upload_file(path_or_fileobj=b"keep", path_in_repo="keep.txt", repo_id=repo)
    before = alice.model_info(repo).sha
    with pytest.raises(EntryNotFoundError):
        alice.create_commit(
            repo,
            [
                CommitOperationAdd("new.txt", b"new"),
                CommitOperationAdd("new.safetensors", b"\0" * 100),
                CommitOperationDelete("missing.txt"),
            ],
            commit_message="half of it is wrong",
        )
    assert alice.model_info(repo).sha == before
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "keep.txt"]
    assert len(alice.list_repo_commits(repo)) == 2


def test_commit_listing_is_paged_newest_first(alice: HfApi, repo: str) -> None:
    for i in range(4):
        alice.upload_file(path_or_fileobj=str(i).encode(), path_in_repo=f"f{i}.txt", repo_id=repo)
    commits = alice.list_repo_commits(repo)  # the session server pages by 2
    assert [c.title for c in commits] == [
        "Upload f3.txt with huggingface_hub",
        "Upload f2.txt with huggingface_hub",
        "Upload f1.txt with huggingface_hub",
        "Upload f0.txt with huggingface_hub",
        "initial commit",
    ]
    assert commits[-1].authors == ["system"]
    assert commits[0].commit_id == alice.model_info(repo).sha
    assert len({c.commit_id for c in commits}) == 5


def test_tree_listing_paths_info_and_paging(alice: HfApi, repo: str) -> None:
    alice.create_commit(
        repo,
        [CommitOperationAdd(p, p.encode()) for p in ("a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt", "d.txt")],
        commit_message="tree",
    )
    top = list(alice.list_repo_tree(repo))  # 4 entries, pages of 3
    assert sorted(e.path for e in top) == [".gitattributes", "a", "c.txt", "d.txt"]
    assert isinstance(next(e for e in top if e.path == "a"), RepoFolder)
    everything = list(alice.list_repo_tree(repo, recursive=True))
    assert sorted(e.path for e in everything) == sorted(
        [".gitattributes", "a", "a/1.txt", "a/2.txt", "a/b", "a/b/3.txt", "c.txt", "d.txt"]
    )
    assert sorted(e.path for e in alice.list_repo_tree(repo, path_in_repo="a")) == [
        "a/1.txt",
        "a/2.txt",
        "a/b",
    ]
    with pytest.raises(EntryNotFoundError):
        list(alice.list_repo_tree(repo, path_in_repo="nope"))
    infos = alice.get_paths_info(repo, ["a", "c.txt", "missing.txt"], expand=True)
    assert {type(i).__name__: i.path for i in infos} == {"RepoFolder": "a", "RepoFile": "c.txt"}
    assert all(i.last_commit is not None and i.last_commit.title == "tree" for i in infos)
    expanded = list(alice.list_repo_tree(repo, expand=True))
    gitattributes = next(e for e in expanded if e.path == ".gitattributes")
    assert gitattributes.last_commit is not None and gitattributes.last_commit.title == "initial commit"


def test_bad_paths_are_400(alice: HfApi, repo: str) -> None:
    for bad in ("../escape.txt", "a/../../b.txt", "/abs.txt"):
        op = CommitOperationAdd("placeholder.txt", b"x")
        op.path_in_repo = bad  # the client refuses these itself; make it send them anyway
        with pytest.raises(BadRequestError, match="Invalid path"):
            alice.create_commit(repo, [op], commit_message="evil")
    with pytest.raises(BadRequestError, match="Invalid path"):
        alice.create_commit(repo, [CommitOperationAdd("nul\0.txt", b"x")], commit_message="nul")
    with pytest.raises(BadRequestError, match="Invalid path"):
        alice.get_paths_info(repo, ["../etc/passwd"])
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes"]


def test_invalid_card_metadata_is_refused(alice: HfApi, repo: str) -> None:
    with pytest.raises(ValueError, match="Invalid metadata"):
        alice.upload_file(
            path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo
        )


def test_branches_and_refs(alice: HfApi, repo: str) -> None:
    alice.create_branch(repo, branch="dev")
    alice.create_branch(repo, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_branch(repo, branch="dev")
    assert err.value.response.status_code == 409
    alice.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=repo, revision="dev")
    assert "dev.txt" in alice.list_repo_files(repo, revision="dev")
    assert "dev.txt" not in alice.list_repo_files(repo)
    alice.create_tag(repo, tag="v1", revision="dev")
    refs = alice.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [t.name for t in refs.tags] == ["v1"]
    dev_head = next(b.target_commit for b in refs.branches if b.name == "dev")
    assert refs.tags[0].target_commit == dev_head
    assert alice.model_info(repo, revision="v1").sha == dev_head
    alice.delete_branch(repo, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        alice.list_repo_files(repo, revision="dev")
    with pytest.raises(RevisionNotFoundError):
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="nope")


def test_create_pr_commit_and_push_to_it(alice: HfApi, repo: str) -> None:
    info = alice.create_commit(
        repo, [CommitOperationAdd("pr.txt", b"from a pr")], commit_message="Propose", create_pr=True
    )
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert "pr.txt" not in alice.list_repo_files(repo)
    assert "pr.txt" in alice.list_repo_files(repo, revision="refs/pr/1")
    alice.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id=repo, revision="refs/pr/1")
    refs = alice.list_repo_refs(repo, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"]
    details = alice.get_discussion_details(repo, 1)
    assert details.is_pull_request and details.status == "open"
    assert [e.type for e in details.events] == ["comment", "commit", "commit"]
    assert details.diff is not None and "b/more.txt" in details.diff


def test_oversized_uploads_are_refused(tmp_path: Path) -> None:
    with run_localhub(tmp_path / "small", max_upload_bytes=1000) as small:
        small.add_user("dan", "tok-dan-12345")
        api = HfApi(endpoint=small.endpoint, token="tok-dan-12345")
        api.create_repo("dan/limits")
        with pytest.raises(ValueError, match="File too large"):
            api.upload_file(path_or_fileobj=b"\0" * 5000, path_in_repo="big.bin", repo_id="dan/limits")
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"t" * 5000, path_in_repo="big.txt", repo_id="dan/limits")
        assert err.value.response.status_code == 413
        api.upload_file(path_or_fileobj=b"t" * 500, path_in_repo="ok.txt", repo_id="dan/limits")
        assert sorted(api.list_repo_files("dan/limits")) == [".gitattributes", "ok.txt"]


def _upload_action(api: HfApi, repo: str, data: bytes) -> dict[str, object]:
    actions, errors, _ = post_lfs_batch_info(
        upload_infos=[UploadInfo.from_bytes(data)],
        token=api.token,
        repo_type="model",
        repo_id=repo,
        endpoint=api.endpoint,
    )
    assert not errors
    return actions[0]["actions"]["upload"]  # type: ignore[no-any-return]


def test_tampered_or_expired_upload_links_are_refused(alice: HfApi, repo: str) -> None:
    data = b"\0" + os.urandom(5000)
    href = str(_upload_action(alice, repo, data)["href"])
    session = get_session()
    other = hashlib.sha256(b"other").hexdigest()
    tampered = [
        href.replace(hashlib.sha256(data).hexdigest(), other),  # another object
        href.replace(f"size={len(data)}", f"size={len(data) + 1}"),  # another size
        href.replace("expires=", "expires=9"),  # a later expiry
        href[:-4] + ("0000" if not href.endswith("0000") else "1111"),  # a forged signature
    ]
    for link in tampered:
        response = session.put(link, content=data)
        assert response.status_code == 403, link
    wrong_content = session.put(href, content=b"\0" + os.urandom(5000))
    assert wrong_content.status_code == 400
    # none of that left an object the repo could reference
    op = CommitOperationAdd("x.bin", data)
    op._upload_mode = "lfs"
    op._is_uploaded = True  # pretend, so the client commits without uploading
    with pytest.raises(BadRequestError, match="was not uploaded"):
        alice.create_commit(repo, [op], commit_message="reference an object that never arrived")
    # the genuine link, with the genuine bytes, works (and the PUT carries no token)
    assert session.put(href, content=data).status_code == 200
    alice.create_commit(repo, [CommitOperationAdd("x.bin", data)], commit_message="now it is there")
    assert "x.bin" in alice.list_repo_files(repo)


def test_expired_link(tmp_path: Path) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    with run_localhub(tmp_path / "ttl", clock=lambda: now[0], upload_link_ttl_seconds=60) as short:
        short.add_user("erin", "tok-erin-12345")
        api = HfApi(endpoint=short.endpoint, token="tok-erin-12345")
        api.create_repo("erin/ttl")
        data = b"\0" + os.urandom(100)
        href = str(_upload_action(api, "erin/ttl", data)["href"])
        now[0] += timedelta(seconds=61)  # the hub's clock passes the link's expiry
        response = get_session().put(href, content=data)
        assert response.status_code == 403 and "expired" in response.text
        still_valid = str(_upload_action(api, "erin/ttl", data)["href"])
        assert get_session().put(still_valid, content=data).status_code == 200


def test_an_interrupted_upload_leaves_nothing(alice: HfApi, repo: str, hub: LocalHubServer) -> None:
    import httpx2

    data = b"\0" + os.urandom(200_000)
    href = str(_upload_action(alice, repo, data)["href"])
    before = alice.model_info(repo).sha

    def cut_short() -> Iterator[bytes]:
        yield data[:50_000]
        raise ConnectionAbortedError("the client died mid-upload")

    with pytest.raises((ConnectionAbortedError, httpx2.HTTPError)):
        get_session().put(href, content=cut_short())
    deadline = time.monotonic() + 5
    while any(hub.hub.blobs.tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(hub.hub.blobs.tmp_dir.iterdir())  # the partial file is gone
    assert not hub.hub.blobs.exists(hashlib.sha256(data).hexdigest())
    assert alice.model_info(repo).sha == before
