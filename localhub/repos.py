"""Repositories as git sees them: commits that each record their whole tree, and refs.

A commit stores its full manifest (path -> blob) so any revision is read in one query and
a commit is one transaction: `apply` checks the parent, builds the new manifest, writes the
commit and moves the ref, and if anything fails nothing of it remains.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from localhub.accounts import new_object_id
from localhub.errors import Conflict, EntryNotFound, PreconditionFailed
from localhub.gitobj import EMPTY_TREE_OID, FileEntry, commit_oid, tree_oids

RepoType = Literal["model", "dataset", "space"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset", "space")
URL_PREFIX: Mapping[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
HEX_RE = re.compile(r"^[0-9a-f]{5,40}$")


@dataclass(frozen=True)
class Repo:
    pk: int
    id: str
    type: RepoType
    namespace: str
    name: str
    private: bool
    gated: Literal["auto", "manual"] | None
    sdk: str | None
    created_at: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def web_path(self) -> str:
        """Path of the repo's page under the endpoint, e.g. ``datasets/ns/name``."""
        return f"{URL_PREFIX[self.type]}{self.repo_id}"


@dataclass(frozen=True)
class Commit:
    oid: str
    parents: tuple[str, ...]
    tree: str
    author: str
    title: str
    message: str
    created_at: str


@dataclass(frozen=True)
class AddFile:
    entry: FileEntry


@dataclass(frozen=True)
class DeleteFile:
    path: str


@dataclass(frozen=True)
class DeleteFolder:
    path: str


Change = AddFile | DeleteFile | DeleteFolder


def _repo(row: sqlite3.Row) -> Repo:
    return Repo(
        pk=row["pk"],
        id=row["id"],
        type=row["type"],
        namespace=row["namespace"],
        name=row["name"],
        private=bool(row["private"]),
        gated=row["gated"],
        sdk=row["sdk"],
        created_at=row["created_at"],
    )


def _commit(row: sqlite3.Row) -> Commit:
    return Commit(
        oid=row["oid"],
        parents=tuple(json.loads(row["parents"])),
        tree=row["tree"],
        author=row["author"],
        title=row["title"],
        message=row["message"],
        created_at=row["created_at"],
    )


def apply_changes(files: Mapping[str, FileEntry], changes: Iterable[Change]) -> dict[str, FileEntry]:
    """The manifest after `changes`, in order; pure.

    Raises:
        EntryNotFound: a deleted file or folder does not exist.
        Conflict: a file would also be a folder (``a`` and ``a/b``).
    """
    result = dict(files)
    for change in changes:
        if isinstance(change, AddFile):
            result[change.entry.path] = change.entry
        elif isinstance(change, DeleteFile):
            if result.pop(change.path, None) is None:
                raise EntryNotFound("", change.path)
        else:
            prefix = change.path.rstrip("/") + "/"
            doomed = [p for p in result if p.startswith(prefix)]
            if not doomed:
                raise EntryNotFound("", change.path)
            for path in doomed:
                del result[path]
    folders = {p.rsplit("/", 1)[0] for p in result if "/" in p}
    for folder in folders:
        parts = folder.split("/")
        for depth in range(1, len(parts) + 1):
            if "/".join(parts[:depth]) in result:
                raise Conflict(
                    f"Cannot commit: {'/'.join(parts[:depth])!r} would be both a file and a folder."
                )
    return result


class Repos:
    """Reads and writes repositories through the connection of the caller's transaction."""

    def get(self, conn: sqlite3.Connection, repo_type: str, namespace: str, name: str) -> Repo | None:
        row = conn.execute(
            "SELECT * FROM repos WHERE type = ? AND namespace = ? AND name = ?", (repo_type, namespace, name)
        ).fetchone()
        return _repo(row) if row else None

    def by_pk(self, conn: sqlite3.Connection, pk: int) -> Repo | None:
        row = conn.execute("SELECT * FROM repos WHERE pk = ?", (pk,)).fetchone()
        return _repo(row) if row else None

    def create(
        self,
        conn: sqlite3.Connection,
        *,
        repo_type: RepoType,
        namespace: str,
        name: str,
        private: bool,
        sdk: str | None,
        initial_files: Mapping[str, FileEntry],
        moment: datetime,
        now: str,
    ) -> Repo:
        conn.execute(
            "INSERT INTO repos (id, type, namespace, name, private, gated, sdk, created_at) "
            "VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
            (new_object_id(), repo_type, namespace, name, int(private), sdk, now),
        )
        repo = self.get(conn, repo_type, namespace, name)
        assert repo is not None
        first = self.write_commit(
            conn,
            repo,
            (),
            initial_files,
            author="system",
            title="initial commit",
            message="",
            moment=moment,
            now=now,
        )
        self.set_ref(conn, repo, "refs/heads/main", first.oid)
        return repo

    def delete(self, conn: sqlite3.Connection, repo: Repo) -> None:
        for table in ("commits", "commit_files", "refs", "lfs_objects"):
            conn.execute(f"DELETE FROM {table} WHERE repo_pk = ?", (repo.pk,))
        conn.execute(
            "DELETE FROM events WHERE discussion_pk IN (SELECT pk FROM discussions WHERE repo_pk = ?)",
            (repo.pk,),
        )
        conn.execute("DELETE FROM discussions WHERE repo_pk = ?", (repo.pk,))
        conn.execute("DELETE FROM repos WHERE pk = ?", (repo.pk,))

    def update_settings(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        *,
        private: bool | None,
        gated: str | Literal[False] | None,
    ) -> None:
        if private is not None:
            conn.execute("UPDATE repos SET private = ? WHERE pk = ?", (int(private), repo.pk))
        if gated is not None:
            conn.execute("UPDATE repos SET gated = ? WHERE pk = ?", (gated or None, repo.pk))

    # refs

    def ref(self, conn: sqlite3.Connection, repo: Repo, name: str) -> str | None:
        row = conn.execute(
            "SELECT target FROM refs WHERE repo_pk = ? AND name = ?", (repo.pk, name)
        ).fetchone()
        return row["target"] if row else None

    def refs(self, conn: sqlite3.Connection, repo: Repo) -> list[tuple[str, str]]:
        rows = conn.execute(
            "SELECT name, target FROM refs WHERE repo_pk = ? ORDER BY name", (repo.pk,)
        ).fetchall()
        return [(r["name"], r["target"]) for r in rows]

    def set_ref(self, conn: sqlite3.Connection, repo: Repo, name: str, target: str) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO refs (repo_pk, name, target) VALUES (?, ?, ?)", (repo.pk, name, target)
        )

    def delete_ref(self, conn: sqlite3.Connection, repo: Repo, name: str) -> None:
        conn.execute("DELETE FROM refs WHERE repo_pk = ? AND name = ?", (repo.pk, name))

    def resolve_ref_name(self, conn: sqlite3.Connection, repo: Repo, revision: str) -> str | None:
        """The full ref a revision names (``main`` -> ``refs/heads/main``), or None for a commit id."""
        for candidate in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if candidate.startswith("refs/") and self.ref(conn, repo, candidate) is not None:
                return candidate
        return None

    def resolve(self, conn: sqlite3.Connection, repo: Repo, revision: str) -> Commit | None:
        """The commit a branch, tag, PR ref or (abbreviated) commit id points to."""
        ref_name = self.resolve_ref_name(conn, repo, revision)
        if ref_name is not None:
            target = self.ref(conn, repo, ref_name)
            return self.commit(conn, repo, target) if target else None
        if HEX_RE.fullmatch(revision):
            rows = conn.execute(
                "SELECT * FROM commits WHERE repo_pk = ? AND oid LIKE ? LIMIT 2", (repo.pk, revision + "%")
            ).fetchall()
            if len(rows) == 1:
                return _commit(rows[0])
        return None

    # commits

    def commit(self, conn: sqlite3.Connection, repo: Repo, oid: str) -> Commit | None:
        row = conn.execute("SELECT * FROM commits WHERE repo_pk = ? AND oid = ?", (repo.pk, oid)).fetchone()
        return _commit(row) if row else None

    def files(self, conn: sqlite3.Connection, repo: Repo, commit_oid_: str) -> dict[str, FileEntry]:
        rows = conn.execute(
            "SELECT path, sha256, size, lfs, oid FROM commit_files WHERE repo_pk = ? AND commit_oid = ? ORDER BY path",
            (repo.pk, commit_oid_),
        ).fetchall()
        return {
            r["path"]: FileEntry(
                path=r["path"], sha256=r["sha256"], size=r["size"], lfs=bool(r["lfs"]), oid=r["oid"]
            )
            for r in rows
        }

    def history(self, conn: sqlite3.Connection, repo: Repo, head: str) -> list[Commit]:
        """Every commit reachable from `head`, newest first."""
        rows = conn.execute("SELECT rowid, * FROM commits WHERE repo_pk = ?", (repo.pk,)).fetchall()
        by_oid = {r["oid"]: r for r in rows}
        seen: set[str] = set()
        stack = [head]
        while stack:
            oid = stack.pop()
            if oid in seen or oid not in by_oid:
                continue
            seen.add(oid)
            stack.extend(json.loads(by_oid[oid]["parents"]))
        ordered = sorted((by_oid[o] for o in seen), key=lambda r: r["rowid"], reverse=True)
        return [_commit(r) for r in ordered]

    def write_commit(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        parents: tuple[str, ...],
        files: Mapping[str, FileEntry],
        *,
        author: str,
        title: str,
        message: str,
        moment: datetime,
        now: str,
    ) -> Commit:
        """Store a commit of the whole manifest `files`; moves no ref."""
        tree = tree_oids(files.values())[""] if files else EMPTY_TREE_OID
        oid = commit_oid(tree, list(parents), author, int(moment.timestamp()), title, message)
        if self.commit(conn, repo, oid) is not None:  # same tree, parents, second and message: make it unique
            message = message + "\n"
            oid = commit_oid(tree, list(parents), author, int(moment.timestamp()), title, message)
        conn.execute(
            "INSERT INTO commits (repo_pk, oid, parents, tree, author, title, message, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (repo.pk, oid, json.dumps(list(parents)), tree, author, title, message, now),
        )
        conn.executemany(
            "INSERT INTO commit_files (repo_pk, commit_oid, path, sha256, size, lfs, oid) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(repo.pk, oid, f.path, f.sha256, f.size, int(f.lfs), f.oid) for f in files.values()],
        )
        return Commit(
            oid=oid, parents=parents, tree=tree, author=author, title=title, message=message, created_at=now
        )

    def apply(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        ref_name: str,
        changes: list[Change],
        *,
        author: str,
        title: str,
        message: str,
        moment: datetime,
        now: str,
        expected_parent: str | None = None,
    ) -> tuple[Commit, str]:
        """Commit `changes` on top of `ref_name` and move it; return the commit and the previous head.

        Raises:
            PreconditionFailed: `expected_parent` is given and is not the ref's head.
            EntryNotFound: a deletion names a path that does not exist.
        """
        head = self.ref(conn, repo, ref_name)
        assert head is not None, "callers resolve the ref first"
        if expected_parent is not None and not head.startswith(expected_parent.lower()):
            raise PreconditionFailed(
                f"A commit has happened since. Please refresh and try again (parent commit {expected_parent} "
                f"is not the head {head} of {ref_name})."
            )
        try:
            files = apply_changes(self.files(conn, repo, head), changes)
        except EntryNotFound as exc:
            raise EntryNotFound(repo.repo_id, f"{exc.path}: A file with this name doesn't exist") from None
        new = self.write_commit(
            conn, repo, (head,), files, author=author, title=title, message=message, moment=moment, now=now
        )
        self.set_ref(conn, repo, ref_name, new.oid)
        return new, head

    # LFS objects a repo may reference

    def record_lfs(self, conn: sqlite3.Connection, repo: Repo, sha256: str, size: int) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO lfs_objects (repo_pk, sha256, size) VALUES (?, ?, ?)",
            (repo.pk, sha256, size),
        )

    def lfs_size(self, conn: sqlite3.Connection, repo: Repo, sha256: str) -> int | None:
        row = conn.execute(
            "SELECT size FROM lfs_objects WHERE repo_pk = ? AND sha256 = ?", (repo.pk, sha256)
        ).fetchone()
        return int(row["size"]) if row else None
