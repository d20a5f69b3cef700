"""Small pure pieces checked against their references: git's own ids, card parsing, the public surface."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import localhub
from localhub.cards import card_tags, parse_card
from localhub.errors import BadRequest, InvalidPath
from localhub.gitobj import commit_oid, git_blob_oid, make_entry, tree_oids, validate_path
from localhub.repos import AddFile, DeleteFolder, apply_changes


def test_public_surface() -> None:
    assert sorted(localhub.__all__) == [
        "Delivery",
        "HubConfig",
        "LocalHub",
        "LocalHubError",
        "LocalHubServer",
        "Webhook",
    ]
    from localhub.cli import main
    from localhub.testing import run_localhub

    assert callable(main) and callable(run_localhub)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
def test_blob_tree_and_commit_ids_match_git(tmp_path: Path) -> None:
    files = {"README.md": b"hi\n", "a/b.txt": b"b\n", "a/c/d.bin": b"\0\1", "a-b.txt": b"sorts before a/"}
    run = lambda *args: subprocess.run(  # noqa: E731
        ["git", *args],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_DATE": "1700000000 +0000",
            "GIT_COMMITTER_DATE": "1700000000 +0000",
            "HOME": str(tmp_path),
        },
    ).stdout.strip()
    run("init", "-q")
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
        assert git_blob_oid(data) == run("hash-object", path)
    run("add", "-A")
    entries = [make_entry(p, "0" * 64, len(d), False, git_blob_oid(d)) for p, d in files.items()]
    trees = tree_oids(entries)
    assert trees[""] == run("write-tree")
    assert trees["a"] == run("rev-parse", f"{trees['']}:a")
    assert trees["a/c"] == run("rev-parse", f"{trees['']}:a/c")
    commit = run(
        "-c",
        "user.name=alice",
        "-c",
        "user.email=alice@users.noreply.localhub",
        "commit-tree",
        trees[""],
        "-m",
        "first",
    )
    assert commit == commit_oid(trees[""], [], "alice", 1700000000, "first", "")


def test_paths_that_could_escape_are_refused() -> None:
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a\0b", "a\\b"):
        with pytest.raises(InvalidPath):
            validate_path(bad)
    assert validate_path("a/b.c") == "a/b.c"


def test_apply_changes_refuses_file_folder_clashes() -> None:
    entry = make_entry("a", "0" * 64, 1, True)
    nested = make_entry("a/b", "1" * 64, 1, True)
    with pytest.raises(localhub.LocalHubError):
        apply_changes({"a": entry}, [AddFile(nested)])
    assert apply_changes({"a/b": nested}, [DeleteFolder("a")]) == {}


def test_card_parsing_and_tags() -> None:
    card = parse_card("---\nbase_model: org/one\ndatasets: [d1]\n---\ntext")
    assert card == {"base_model": "org/one", "datasets": ["d1"]}
    assert card_tags(card) == ["dataset:d1", "base_model:org/one", "base_model:finetune:org/one"]
    assert parse_card("no front matter") is None
    with pytest.raises(BadRequest):
        parse_card("---\n- a list\n---\n")
