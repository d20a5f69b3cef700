"""Repository use cases: create, delete, settings, info, tree, paths, refs, commits, branches, tags."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from localhub.accounts import Identity, validate_name
from localhub.cards import parse_card
from localhub.errors import BadRequest, Conflict, EntryNotFound, Forbidden, RevisionNotFound, Unauthorized
from localhub.gitobj import git_blob_oid, make_entry, tree_oids, validate_path
from localhub.hub import LocalHub, require_namespace_write
from localhub.repos import Commit, Repo, RepoType
from localhub.views import commit_view, file_view, folder_view, repo_info_view
from localhub.webhooks import repo_payload

GITATTRIBUTES = """*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar.gz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""
BRANCH_RE = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!refs/)[A-Za-z0-9._/-]{1,200}(?<!/)$")


@dataclass(frozen=True)
class RepoKey:
    """How a request names a repo: its type and ``namespace/name``."""

    type: RepoType
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


def last_change(
    hub: LocalHub, conn: sqlite3.Connection, repo: Repo, history: list[Commit], path: str, is_dir: bool
) -> Commit | None:
    """The newest commit of `history` that changed `path` (a file's blob or a folder's tree)."""

    def oid_at(commit: Commit) -> str | None:
        files = hub.repos.files(conn, repo, commit.oid)
        if is_dir:
            return tree_oids(files.values()).get(path)
        entry = files.get(path)
        return entry.oid if entry else None

    for i, commit in enumerate(history):
        parent = history[i + 1] if i + 1 < len(history) else None
        if parent is None or oid_at(commit) != oid_at(parent):
            return commit
    return None


class RepoService:
    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub

    def create(
        self,
        identity: Identity | None,
        repo_type: RepoType,
        name: str,
        organization: str | None,
        private: bool,
        sdk: str | None,
        base_url: str,
    ) -> dict[str, Any]:
        """Create a repo with the Hub's initial commit (a `.gitattributes`).

        Raises:
            Unauthorized, Forbidden: no token, or not the caller's namespace.
            Conflict: the repo exists (the error carries its url, as the Hub's 409 does).
        """
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to create a repository.")
        namespace = organization or identity.user.name
        validate_name(name)
        require_namespace_write(identity, namespace)
        if repo_type == "space" and sdk is None:
            raise BadRequest("A Space needs an sdk (gradio, streamlit, docker or static).")
        moment, now = self.hub.now()
        content = GITATTRIBUTES.encode()
        sha256 = self.hub.blobs.put_bytes(content)
        initial = {
            ".gitattributes": make_entry(".gitattributes", sha256, len(content), False, git_blob_oid(content))
        }
        with self.hub.db.write() as conn:
            existing = self.hub.repos.get(conn, repo_type, namespace, name)
            if existing is not None:
                raise Conflict(
                    f"You already created this {repo_type} repo", url=f"{base_url}/{existing.web_path}"
                )
            repo = self.hub.repos.create(
                conn,
                repo_type=repo_type,
                namespace=namespace,
                name=name,
                private=private,
                sdk=sdk,
                initial_files=initial,
                moment=moment,
                now=now,
            )
            owner_id = self.hub.account_id(conn, namespace)
            queued = self.hub.emit(
                conn, repo, "repo", "repo", "create", {"repo": repo_payload(repo, owner_id, base_url)}
            )
        if queued:
            self.hub.outbox_written()
        return {"url": f"{base_url}/{repo.web_path}", "name": repo.repo_id, "id": repo.id}

    def delete(self, identity: Identity | None, key: RepoKey, base_url: str) -> None:
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            owner_id = self.hub.account_id(conn, repo.namespace)
            queued = self.hub.emit(
                conn, repo, "repo", "repo", "delete", {"repo": repo_payload(repo, owner_id, base_url)}
            )
            self.hub.repos.delete(conn, repo)
        if queued:
            self.hub.outbox_written()

    def update_settings(
        self,
        identity: Identity | None,
        key: RepoKey,
        private: bool | None,
        gated: Literal["auto", "manual", False] | None,
    ) -> None:
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            self.hub.repos.update_settings(conn, repo, private=private, gated=gated)

    def info(self, identity: Identity | None, key: RepoKey, revision: str, blobs: bool) -> dict[str, Any]:
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            files = self.hub.repos.files(conn, repo, commit.oid)
        card = None
        readme = files.get("README.md")
        if readme is not None:
            try:
                card = parse_card(self.hub.blobs.read(readme.sha256).decode("utf-8", errors="replace"))
            except BadRequest:
                card = None
        return repo_info_view(repo, commit, files, card, blobs=blobs)

    def readme(self, identity: Identity | None, key: RepoKey, revision: str) -> str | None:
        """The README.md text at a revision, or None if the repo has none."""
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            readme = self.hub.repos.files(conn, repo, commit.oid).get("README.md")
        if readme is None:
            return None
        return self.hub.blobs.read(readme.sha256).decode("utf-8", errors="replace")

    def tree(
        self, identity: Identity | None, key: RepoKey, revision: str, path: str, recursive: bool, expand: bool
    ) -> list[dict[str, Any]]:
        """Entries under `path` (its children, or all descendants if `recursive`), folders first."""
        path = path.strip("/")
        if path:
            validate_path(path)
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            files = self.hub.repos.files(conn, repo, commit.oid)
            folders = tree_oids(files.values())
            if path and path not in folders:
                raise EntryNotFound(repo.repo_id, path)
            prefix = f"{path}/" if path else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            history = self.hub.repos.history(conn, repo, commit.oid) if expand else []
            entries = [
                folder_view(f, oid, last_change(self.hub, conn, repo, history, f, True) if expand else None)
                for f, oid in sorted(folders.items())
                if f and wanted(f)
            ]
            entries += [
                file_view(e, last_change(self.hub, conn, repo, history, p, False) if expand else None)
                for p, e in files.items()
                if wanted(p)
            ]
        return entries

    def paths_info(
        self, identity: Identity | None, key: RepoKey, revision: str, paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        cleaned = [validate_path(p.strip("/")) for p in paths]
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            files = self.hub.repos.files(conn, repo, commit.oid)
            folders = tree_oids(files.values())
            history = self.hub.repos.history(conn, repo, commit.oid) if expand else []
            result: list[dict[str, Any]] = []
            for p in dict.fromkeys(cleaned):
                if p in files:
                    result.append(
                        file_view(
                            files[p], last_change(self.hub, conn, repo, history, p, False) if expand else None
                        )
                    )
                elif p in folders:
                    result.append(
                        folder_view(
                            p,
                            folders[p],
                            last_change(self.hub, conn, repo, history, p, True) if expand else None,
                        )
                    )
        return result

    def refs(self, identity: Identity | None, key: RepoKey, include_prs: bool) -> dict[str, Any]:
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            refs = self.hub.repos.refs(conn, repo)
        out: dict[str, Any] = {"branches": [], "converts": [], "tags": []}
        prs = []
        for name, target in refs:
            if name.startswith("refs/heads/"):
                out["branches"].append(
                    {"name": name[len("refs/heads/") :], "ref": name, "targetCommit": target}
                )
            elif name.startswith("refs/tags/"):
                out["tags"].append({"name": name[len("refs/tags/") :], "ref": name, "targetCommit": target})
            elif name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": target})
        if include_prs:
            out["pullRequests"] = sorted(prs, key=lambda r: int(r["name"].rsplit("/", 1)[1]))
        return out

    def commits(self, identity: Identity | None, key: RepoKey, revision: str) -> list[dict[str, Any]]:
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            history = self.hub.repos.history(conn, repo, commit.oid)
        return [commit_view(c) for c in history]

    def create_ref(
        self,
        identity: Identity | None,
        key: RepoKey,
        kind: Literal["branch", "tag"],
        name: str,
        starting_point: str | None,
    ) -> None:
        """Create a branch or tag at `starting_point` (default: the head of main).

        Raises:
            Conflict: it exists already. BadRequest: not a valid name. RevisionNotFound: bad starting point.
        """
        if not BRANCH_RE.fullmatch(name):
            raise BadRequest(f"Invalid {kind} name {name!r}.")
        full = f"refs/heads/{name}" if kind == "branch" else f"refs/tags/{name}"
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            if self.hub.repos.ref(conn, repo, full) is not None:
                raise Conflict(f"Reference already exists: {full}")
            start = self.hub.resolve(conn, repo, starting_point or "main")
            self.hub.repos.set_ref(conn, repo, full, start.oid)

    def delete_ref(
        self, identity: Identity | None, key: RepoKey, kind: Literal["branch", "tag"], name: str
    ) -> None:
        full = f"refs/heads/{name}" if kind == "branch" else f"refs/tags/{name}"
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            if full == "refs/heads/main":
                raise Forbidden("Cannot delete the default branch 'main'.")
            if self.hub.repos.ref(conn, repo, full) is None:
                raise RevisionNotFound(repo.repo_id, name)
            self.hub.repos.delete_ref(conn, repo, full)
