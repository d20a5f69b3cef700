"""The commit protocol: preupload, LFS batch and uploads, and the NDJSON commit itself.

Bytes arrive first (inline in the commit, or through signed LFS links) and land in the blob
store under their sha256; nothing is visible in a repo until the commit transaction that
references them moves a ref. An upload that fails or is cut leaves only a temporary file.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localhub.accounts import Identity
from localhub.cards import check_card
from localhub.discussions import Discussion
from localhub.errors import BadRequest, NotFound, PayloadTooLarge, Unauthorized
from localhub.gitobj import git_blob_oid, make_entry, validate_path
from localhub.hub import LocalHub
from localhub.lfs import UploadGrant
from localhub.repo_service import RepoKey
from localhub.repos import AddFile, Change, DeleteFile, DeleteFolder, Repo
from localhub.views import comment_data
from localhub.webhooks import discussion_payload, repo_payload

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class PreuploadFile(BaseModel):
    path: str
    sample: str = ""
    size: int = Field(ge=0)


class PreuploadRequest(BaseModel):
    files: list[PreuploadFile]
    gitIgnore: str | None = None


class CommitHeader(BaseModel):
    summary: str = Field(min_length=1)
    description: str = ""
    parentCommit: str | None = None


class InlineFile(BaseModel):
    path: str
    content: str
    encoding: str = "base64"


class LfsFileOp(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str
    oid: str
    algo: str = "sha256"
    size: int | None = None


class PathOp(BaseModel):
    path: str


class LfsObject(BaseModel):
    oid: str
    size: int = Field(ge=0)


class LfsBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    operation: str
    objects: list[LfsObject]


class MultipartPart(BaseModel):
    partNumber: int
    etag: str


class MultipartCompletion(BaseModel):
    oid: str
    parts: list[MultipartPart]


@dataclass(frozen=True)
class ParsedCommit:
    header: CommitHeader
    changes: list[Change]


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.split()]


def _matches(patterns: list[str], path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p.lstrip("/")) for p in patterns)


def _gitignore_patterns(text: str | None) -> list[str]:
    if not text:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("#", "!"))]


def _validated(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"Invalid {what}: {exc.errors(include_url=False)}") from None


class CommitService:
    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub
        # (repo pk, oid) -> (next part number, sha256 of the parts before it): multipart uploads whose
        # parts arrive in order are hashed as they stream in, so completion need not read the file again.
        self._running: dict[tuple[int, str], tuple[int, Any]] = {}
        self._running_lock = threading.Lock()

    # preupload

    def preupload(
        self, identity: Identity | None, key: RepoKey, revision: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Tell the client, per file, whether to send it inline or through LFS, and its current oid."""
        request: PreuploadRequest = _validated(PreuploadRequest, body, "preupload request")
        config = self.hub.config
        with self.hub.db.read() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            commit = self.hub.resolve(conn, repo, revision)
            files = self.hub.repos.files(conn, repo, commit.oid)
        attributes = files.get(".gitattributes")
        lfs_patterns = _lfs_patterns(self.hub.blobs.read(attributes.sha256).decode()) if attributes else []
        ignore = _gitignore_patterns(request.gitIgnore)
        answer = []
        for item in request.files:
            path = validate_path(item.path)
            sample = base64.b64decode(item.sample or "")
            lfs = item.size > 0 and (
                item.size > config.regular_file_max_bytes or b"\0" in sample or _matches(lfs_patterns, path)
            )
            existing = files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            answer.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": _matches(ignore, path),
                    "oid": oid,
                }
            )
        return {"files": answer, "commitOid": commit.oid}

    # LFS

    def lfs_batch(
        self, identity: Identity | None, key: RepoKey, body: dict[str, Any], base_url: str
    ) -> dict[str, Any]:
        """Answer the git-lfs batch API: signed upload (or multipart) links, or nothing if already stored."""
        request: LfsBatchRequest = _validated(LfsBatchRequest, body, "LFS batch request")
        if request.operation != "upload":
            raise BadRequest("Only the 'upload' operation is supported; download files through /resolve/.")
        config = self.hub.config
        with self.hub.db.read() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            known = {o.oid: self.hub.repos.lfs_size(conn, repo, o.oid) for o in request.objects}
        expires = int(self.hub.now()[0].timestamp()) + config.upload_link_ttl_seconds
        objects = []
        for obj in request.objects:
            if not SHA256_RE.fullmatch(obj.oid):
                objects.append(
                    {
                        "oid": obj.oid,
                        "size": obj.size,
                        "error": {"code": 422, "message": "Invalid oid: expected a sha256 in lowercase hex."},
                    }
                )
                continue
            if obj.size > config.max_upload_bytes:
                objects.append(
                    {
                        "oid": obj.oid,
                        "size": obj.size,
                        "error": {
                            "code": 413,
                            "message": f"File too large: {obj.size} bytes, the limit is {config.max_upload_bytes} bytes.",
                        },
                    }
                )
                continue
            if known[obj.oid] == obj.size and self.hub.blobs.exists(obj.oid, obj.size):
                objects.append({"oid": obj.oid, "size": obj.size, "authenticated": True})
                continue
            verify = {"href": f"{base_url}/{repo.web_path}.git/info/lfs/objects/verify"}
            if obj.size > config.multipart_threshold_bytes:
                chunk = config.multipart_chunk_bytes
                header: dict[str, str] = {"chunk_size": str(chunk)}
                for part in range(1, math.ceil(obj.size / chunk) + 1):
                    grant = UploadGrant("part", repo.pk, obj.oid, obj.size, part, expires)
                    header[str(part)] = self.hub.signer.url(base_url, grant)
                complete = UploadGrant("complete", repo.pk, obj.oid, obj.size, 0, expires)
                upload = {"href": self.hub.signer.url(base_url, complete), "header": header}
            else:
                grant = UploadGrant("put", repo.pk, obj.oid, obj.size, 0, expires)
                upload = {"href": self.hub.signer.url(base_url, grant)}
            objects.append(
                {
                    "oid": obj.oid,
                    "size": obj.size,
                    "authenticated": True,
                    "actions": {"upload": {**upload, "expires_at": _iso_epoch(expires)}, "verify": verify},
                }
            )
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def check_grant(self, grant: UploadGrant, signature: str) -> Repo:
        """The repo an upload link is for, once its signature and expiry are checked.

        Raises:
            Forbidden: tampered or expired link. NotFound: the repo is gone.
        """
        self.hub.signer.check(grant, signature, self.hub.now()[0].timestamp())
        with self.hub.db.read() as conn:
            repo = self.hub.repos.by_pk(conn, grant.repo_pk)
        if repo is None:
            raise NotFound("The repository this upload link was issued for no longer exists.")
        return repo

    def part_length(self, grant: UploadGrant) -> int:
        chunk = self.hub.config.multipart_chunk_bytes
        parts = math.ceil(grant.size / chunk)
        if not 1 <= grant.part <= parts:
            raise BadRequest(f"Invalid part number {grant.part}: expected 1..{parts}.")
        return chunk if grant.part < parts else grant.size - chunk * (parts - 1)

    def multipart_dir(self, grant: UploadGrant) -> Path:
        return self.hub.blobs.tmp_dir / f"mp-{grant.repo_pk}-{grant.oid}"

    def finish_upload(self, repo: Repo, tmp: Path, sha256: str, size: int, verified: bool) -> None:
        """Adopt an uploaded file (hashing it unless the caller already did) and let `repo` reference it."""
        if verified:
            self.hub.blobs.adopt(tmp, sha256)
        else:
            self.hub.blobs.adopt_verified(tmp, sha256, size)
        with self.hub.db.write() as conn:
            self.hub.repos.record_lfs(conn, repo, sha256, size)

    def part_hasher(self, grant: UploadGrant) -> Any | None:
        """The running sha256 to continue with this part, or None if parts came out of order."""
        with self._running_lock:
            state = self._running.pop((grant.repo_pk, grant.oid), None)
        if grant.part == 1:
            return hashlib.sha256()
        return state[1] if state is not None and state[0] == grant.part else None

    def part_hashed(self, grant: UploadGrant, hasher: Any) -> None:
        with self._running_lock:
            self._running[(grant.repo_pk, grant.oid)] = (grant.part + 1, hasher)

    def complete_multipart(self, repo: Repo, grant: UploadGrant, body: dict[str, Any]) -> None:
        completion: MultipartCompletion = _validated(MultipartCompletion, body, "multipart completion")
        folder = self.multipart_dir(grant)
        parts = math.ceil(grant.size / self.hub.config.multipart_chunk_bytes)
        if completion.oid != grant.oid or sorted(p.partNumber for p in completion.parts) != list(
            range(1, parts + 1)
        ):
            raise BadRequest(f"Multipart completion must list parts 1..{parts} of object {grant.oid}.")
        for part in completion.parts:
            etag_file = folder / f"part-{part.partNumber}.etag"
            if not etag_file.exists() or etag_file.read_text() != part.etag.strip('"'):
                raise BadRequest(f"Part {part.partNumber} was not uploaded, or its etag does not match.")
        data = folder / "data"
        with self._running_lock:
            state = self._running.pop((grant.repo_pk, grant.oid), None)
        try:
            if state is not None and state[0] == parts + 1:
                if data.stat().st_size != grant.size or state[1].hexdigest() != grant.oid:
                    raise BadRequest(
                        f"Uploaded content does not match: expected sha256 {grant.oid} and {grant.size} bytes."
                    )
                self.finish_upload(repo, data, grant.oid, grant.size, verified=True)
            else:
                self.finish_upload(repo, data, grant.oid, grant.size, verified=False)
        finally:
            for leftover in folder.glob("*"):
                leftover.unlink(missing_ok=True)
            folder.rmdir()

    def lfs_verify(self, identity: Identity | None, key: RepoKey, body: dict[str, Any]) -> dict[str, Any]:
        obj: LfsObject = _validated(LfsObject, body, "LFS verify request")
        with self.hub.db.read() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            size = self.hub.repos.lfs_size(conn, repo, obj.oid)
        if size != obj.size or not self.hub.blobs.exists(obj.oid, obj.size):
            raise NotFound(f"LFS object {obj.oid} ({obj.size} bytes) was not uploaded to {repo.repo_id}.")
        return {"oid": obj.oid, "size": obj.size}

    # commit

    def parse_commit(self, lines: list[dict[str, Any]]) -> ParsedCommit:
        """Turn NDJSON items into changes, storing inline files; nothing becomes visible here.

        Raises:
            BadRequest: malformed items, bad paths, bad base64, invalid README metadata.
            PayloadTooLarge: an inline file above the upload limit.
        """
        if not lines or lines[0].get("key") != "header":
            raise BadRequest("A commit payload starts with a 'header' item.")
        header: CommitHeader = _validated(CommitHeader, lines[0].get("value"), "commit header")
        changes: list[Change] = []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value")
            if key == "file":
                op: InlineFile = _validated(InlineFile, value, "file item")
                path = validate_path(op.path)
                if op.encoding != "base64":
                    raise BadRequest(f"Unsupported encoding {op.encoding!r} for {path}: use base64.")
                if len(op.content) * 3 // 4 > self.hub.config.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"{path} is larger than the upload limit of {self.hub.config.max_upload_bytes} bytes."
                    )
                try:
                    content = base64.b64decode(op.content, validate=True)
                except binascii.Error:
                    raise BadRequest(f"Invalid base64 content for {path}.") from None
                if len(content) > self.hub.config.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"{path} is larger than the upload limit of {self.hub.config.max_upload_bytes} bytes."
                    )
                if path == "README.md":
                    check_card(content.decode("utf-8", errors="replace"))
                sha256 = self.hub.blobs.put_bytes(content)
                changes.append(AddFile(make_entry(path, sha256, len(content), False, git_blob_oid(content))))
            elif key == "lfsFile":
                lfs: LfsFileOp = _validated(LfsFileOp, value, "lfsFile item")
                path = validate_path(lfs.path)
                if lfs.algo != "sha256" or not SHA256_RE.fullmatch(lfs.oid):
                    raise BadRequest(f"Invalid LFS reference for {path}: expected a sha256 oid.")
                # size is checked against what was uploaded, in the commit transaction
                changes.append(AddFile(make_entry(path, lfs.oid, lfs.size or 0, True)))
            elif key in ("deletedFile", "deletedFolder"):
                target: PathOp = _validated(PathOp, value, f"{key} item")
                path = validate_path(target.path.rstrip("/"))
                changes.append(DeleteFile(path) if key == "deletedFile" else DeleteFolder(path))
            else:
                raise BadRequest(
                    f"Unknown commit item {key!r}: expected header, file, lfsFile, deletedFile or deletedFolder."
                )
        return ParsedCommit(header=header, changes=changes)

    def commit(
        self,
        identity: Identity | None,
        key: RepoKey,
        revision: str,
        parsed: ParsedCommit,
        create_pr: bool,
        base_url: str,
    ) -> dict[str, Any]:
        """Apply a parsed commit atomically (optionally opening a PR at ``refs/pr/N``)."""
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to commit.")
        moment, now = self.hub.now()
        header = parsed.header
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            changes = [self._checked_lfs(conn, repo, c) for c in parsed.changes]
            ref_name = self.hub.repos.resolve_ref_name(conn, repo, revision)
            if ref_name is None or ref_name.startswith("refs/tags/"):
                self.hub.resolve(conn, repo, revision)  # RevisionNotFound if it names nothing
                raise BadRequest(f"Cannot commit to {revision!r}: commits go to a branch or a PR ref.")
            discussion: Discussion | None = None
            if create_pr:
                head = self.hub.repos.ref(conn, repo, ref_name)
                assert head is not None
                discussion = self.hub.discussions.create(
                    conn,
                    repo.pk,
                    title=header.summary,
                    author=identity.user.name,
                    is_pr=True,
                    status="open",
                    now=now,
                    target_ref=ref_name,
                    base_commit=head,
                )
                description = header.description or "Opened with localhub"
                self.hub.discussions.add_event(
                    conn,
                    discussion,
                    "comment",
                    identity.user.name,
                    comment_data(description, identity.user.name, identity.user.id, now),
                    now,
                )
                ref_name = discussion.pr_ref
                self.hub.repos.set_ref(conn, repo, ref_name, head)
            elif ref_name.startswith("refs/pr/"):
                discussion = self.hub.discussions.get(conn, repo.pk, int(ref_name.rsplit("/", 1)[1]))
            new, old = self.hub.repos.apply(
                conn,
                repo,
                ref_name,
                changes,
                author=identity.user.name,
                title=header.summary,
                message=header.description,
                moment=moment,
                now=now,
                expected_parent=header.parentCommit,
            )
            if discussion is not None:
                self.hub.discussions.add_event(
                    conn,
                    discussion,
                    "commit",
                    identity.user.name,
                    {"subject": header.summary, "oid": new.oid},
                    now,
                )
            owner_id = self.hub.account_id(conn, repo.namespace)
            queued = self.hub.emit(
                conn,
                repo,
                "repo",
                "repo.content",
                "update",
                {
                    # as on the Hub: headSha is main's head; the ref that moved is in updatedRefs
                    "repo": repo_payload(
                        repo, owner_id, base_url, head_sha=self.hub.repos.ref(conn, repo, "refs/heads/main")
                    ),
                    "updatedRefs": [{"ref": ref_name, "oldSha": old, "newSha": new.oid}],
                },
            )
            if create_pr and discussion is not None:
                queued += self.hub.emit(
                    conn,
                    repo,
                    "discussion",
                    "discussion",
                    "create",
                    {
                        "repo": repo_payload(repo, owner_id, base_url),
                        "discussion": discussion_payload(repo, discussion, identity.user.id, base_url),
                    },
                )
        if queued:
            self.hub.outbox_written()
        result: dict[str, Any] = {
            "success": True,
            "commitOid": new.oid,
            "commitUrl": f"{base_url}/{repo.web_path}/commit/{new.oid}",
            "hookOutput": "",
        }
        if create_pr and discussion is not None:
            result["pullRequestUrl"] = f"{base_url}/{repo.web_path}/discussions/{discussion.num}"
        return result

    def _checked_lfs(self, conn: Any, repo: Repo, change: Change) -> Change:
        """An LFS reference is accepted only for content uploaded to (or already in) this repo."""
        if not (isinstance(change, AddFile) and change.entry.lfs):
            return change
        entry = change.entry
        size = self.hub.repos.lfs_size(conn, repo, entry.sha256)
        if size is None or not self.hub.blobs.exists(entry.sha256, size):
            raise BadRequest(
                f"LFS file {entry.path} (oid {entry.sha256}) was not uploaded to {repo.repo_id}: "
                "upload it through the LFS batch API before committing."
            )
        if entry.size and entry.size != size:
            raise BadRequest(
                f"LFS file {entry.path}: size {entry.size} does not match the uploaded {size} bytes."
            )
        return AddFile(make_entry(entry.path, entry.sha256, size, True))


def parse_ndjson(body: bytes) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise BadRequest(f"Line {number} of the commit payload is not JSON.") from None
        if not isinstance(item, dict):
            raise BadRequest(f"Line {number} of the commit payload is not an object.")
        items.append(item)
    return items


def _iso_epoch(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


__all__ = ["CommitService", "parse_ndjson"]
