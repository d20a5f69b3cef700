"""Git-shaped ids, computed the way git computes them, so oids look and behave like the Hub's.

Pure functions, no I/O: blob ids (sha1 over ``blob <len>\\0<data>``), LFS pointer files,
tree ids over a flat manifest, commit ids, and the path rule every write goes through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from localhub.errors import InvalidPath

LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
EMPTY_TREE_OID = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree: where its bytes are (sha256) and how git sees it (oid).

    `oid` is the git blob id: of the content for regular files, of the pointer file for LFS files.
    """

    path: str
    sha256: str
    size: int
    lfs: bool
    oid: str

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


def make_entry(path: str, sha256: str, size: int, lfs: bool, blob_oid: str | None = None) -> FileEntry:
    """Build the entry for a file; regular files need their git blob id (sha1 of the content)."""
    if lfs:
        return FileEntry(path=path, sha256=sha256, size=size, lfs=True, oid=lfs_pointer_oid(sha256, size))
    if blob_oid is None:
        raise ValueError("a regular file needs its git blob oid")
    return FileEntry(path=path, sha256=sha256, size=size, lfs=False, oid=blob_oid)


def git_blob_oid(data: bytes) -> str:
    """sha1 of the git blob object holding `data` (what `git hash-object` prints)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(oid=sha256, size=size).encode()


def lfs_pointer_oid(sha256: str, size: int) -> str:
    return git_blob_oid(lfs_pointer(sha256, size))


def validate_path(path: str) -> str:
    """Return `path` if it is a safe relative file path inside a repo.

    Raises:
        InvalidPath: absolute, empty, with a ``..`` or ``.`` segment, a backslash or a NUL byte.
    """
    if (
        not path
        or "\0" in path
        or "\\" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise InvalidPath(path)
    return path


def _tree_object(entries: list[tuple[str, bool, str]]) -> str:
    """Hash one git tree object from (name, is_dir, oid) entries, sorted the way git sorts them."""
    body = bytearray()
    for name, is_dir, oid in sorted(entries, key=lambda e: e[0] + "/" if e[1] else e[0]):
        body += (b"40000 " if is_dir else b"100644 ") + name.encode() + b"\0" + bytes.fromhex(oid)
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"tree %d\0" % len(body))
    h.update(body)
    return h.hexdigest()


def tree_oids(files: Iterable[FileEntry]) -> dict[str, str]:
    """Return the git tree id of every folder of a flat manifest ("" is the root)."""
    children: dict[str, dict[str, tuple[bool, str]]] = {"": {}}
    for entry in files:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
        parent = "/".join(parts[:-1])
        children[parent][parts[-1]] = (False, entry.oid)
    oids: dict[str, str] = {}
    # Deepest folders first, so each parent sees its children's ids.
    for folder in sorted(children, key=lambda f: -f.count("/") - (1 if f else 0)):
        items = [(name, is_dir, oid) for name, (is_dir, oid) in children[folder].items()]
        oids[folder] = _tree_object(items)
        if folder:
            parent, _, name = folder.rpartition("/")
            children[parent][name] = (True, oids[folder])
    return oids


def commit_oid(
    tree: str, parents: list[str], author: str, timestamp: int, title: str, description: str
) -> str:
    """sha1 of the git commit object for these fields."""
    lines = [f"tree {tree}"] + [f"parent {p}" for p in parents]
    ident = f"{author} <{author}@users.noreply.localhub> {timestamp} +0000"
    lines += [f"author {ident}", f"committer {ident}", "", title]
    if description:
        lines += ["", description]
    body = ("\n".join(lines) + "\n").encode()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"commit %d\0" % len(body))
    h.update(body)
    return h.hexdigest()
