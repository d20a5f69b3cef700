"""Discussion and pull request use cases, in the shapes of the Hub's community API."""

from __future__ import annotations

import sqlite3
from typing import Any

from localhub.accounts import Identity
from localhub.discussions import Discussion, Event
from localhub.errors import BadRequest, Conflict, DiscussionNotFound, Forbidden, NotFound, Unauthorized
from localhub.gitobj import FileEntry
from localhub.hub import LocalHub
from localhub.repo_service import RepoKey
from localhub.repos import Repo
from localhub.views import (
    comment_data,
    discussion_view,
    edited_comment_data,
    event_view,
    hidden_comment_data,
)
from localhub.webhooks import comment_payload, discussion_payload, repo_payload

DEFAULT_DESCRIPTION = "(no description)"


def _diff(base: dict[str, FileEntry], head: dict[str, FileEntry]) -> str:
    """A short git-style summary of what a PR changes (file level, no hunks)."""
    lines = []
    for path in sorted(set(base) | set(head)):
        before, after = base.get(path), head.get(path)
        if before == after:
            continue
        a = f"a/{path}" if before else "/dev/null"
        b = f"b/{path}" if after else "/dev/null"
        lines.append(f"diff --git a/{path} b/{path}\n--- {a}\n+++ {b}\n")
    return "".join(lines)


class DiscussionService:
    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub

    def _require_user(self, identity: Identity | None) -> Identity:
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to take part in discussions.")
        return identity

    def _discussion(self, conn: sqlite3.Connection, repo: Repo, num: int) -> Discussion:
        discussion = self.hub.discussions.get(conn, repo.pk, num)
        if discussion is None:
            raise DiscussionNotFound(repo.repo_id, num)
        return discussion

    def _event_view(self, conn: sqlite3.Connection, event: Event) -> dict[str, Any]:
        return event_view(event, self.hub.account_id(conn, event.author))

    def list(
        self,
        identity: Identity | None,
        key: RepoKey,
        page: int,
        kind: str | None,
        status: str | None,
        author: str | None,
    ) -> dict[str, Any]:
        size = self.hub.config.discussions_page_size
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            found = self.hub.discussions.of_repo(conn, repo.pk)
            if kind == "discussion":
                found = [d for d in found if not d.is_pr]
            elif kind == "pull_request":
                found = [d for d in found if d.is_pr]
            if status == "open":
                found = [d for d in found if d.status in ("open", "draft")]
            elif status == "closed":
                found = [d for d in found if d.status in ("closed", "merged")]
            if author:
                found = [d for d in found if d.author == author]
            start = page * size
            shown = [
                discussion_view(
                    repo,
                    d,
                    self.hub.account_id(conn, d.author),
                    sum(1 for e in self.hub.discussions.events(conn, d) if e.type == "comment"),
                )
                for d in found[start : start + size]
            ]
        return {
            "discussions": shown,
            "count": len(found),
            "start": start,
            "numClosedDiscussions": sum(1 for d in found if d.status in ("closed", "merged")),
        }

    def details(self, identity: Identity | None, key: RepoKey, num: int) -> dict[str, Any]:
        with self.hub.db.read() as conn:
            repo = self.hub.readable_repo(conn, identity, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            return self._details(conn, repo, discussion)

    def _details(self, conn: sqlite3.Connection, repo: Repo, discussion: Discussion) -> dict[str, Any]:
        events = self.hub.discussions.events(conn, discussion)
        data = discussion_view(
            repo,
            discussion,
            self.hub.account_id(conn, discussion.author),
            sum(1 for e in events if e.type == "comment"),
        )
        data["events"] = [self._event_view(conn, e) for e in events]
        if discussion.is_pr:
            changes: dict[str, Any] = {"base": discussion.target_ref or "refs/heads/main"}
            if discussion.merge_commit:
                changes["mergeCommitId"] = discussion.merge_commit
            data["changes"] = changes
            data["filesWithConflicts"] = []
            head = self.hub.repos.ref(conn, repo, discussion.pr_ref)
            if head and discussion.base_commit:
                data["diff"] = _diff(
                    self.hub.repos.files(conn, repo, discussion.base_commit),
                    self.hub.repos.files(conn, repo, head),
                )
        return data

    def create(
        self,
        identity: Identity | None,
        key: RepoKey,
        title: str,
        description: str,
        pull_request: bool,
        base_url: str,
    ) -> dict[str, Any]:
        """Open a discussion (or an empty draft PR at ``refs/pr/N``) whose first comment is `description`."""
        user = self._require_user(identity)
        title = title.strip()
        if not 3 <= len(title) <= 200:
            raise BadRequest("A discussion title must have between 3 and 200 characters.")
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            head = self.hub.repos.ref(conn, repo, "refs/heads/main") if pull_request else None
            discussion = self.hub.discussions.create(
                conn,
                repo.pk,
                title=title,
                author=user.user.name,
                is_pr=pull_request,
                status="draft" if pull_request else "open",
                now=now,
                target_ref="refs/heads/main" if pull_request else None,
                base_commit=head,
            )
            if pull_request and head is not None:
                self.hub.repos.set_ref(conn, repo, discussion.pr_ref, head)
            comment = self.hub.discussions.add_event(
                conn,
                discussion,
                "comment",
                user.user.name,
                comment_data(description or DEFAULT_DESCRIPTION, user.user.name, user.user.id, now),
                now,
            )
            queued = self.hub.emit(
                conn,
                repo,
                "discussion",
                "discussion",
                "create",
                self._payload(conn, repo, discussion, base_url, comment),
            )
        if queued:
            self.hub.outbox_written()
        return {
            "num": discussion.num,
            "pullRequest": pull_request,
            "url": f"{base_url}/{repo.web_path}/discussions/{discussion.num}",
        }

    def _payload(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        discussion: Discussion,
        base_url: str,
        comment: Event | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "repo": repo_payload(repo, self.hub.account_id(conn, repo.namespace), base_url),
            "discussion": discussion_payload(
                repo, discussion, self.hub.account_id(conn, discussion.author), base_url
            ),
        }
        if comment is not None:
            body["comment"] = comment_payload(
                repo, discussion, comment, self.hub.account_id(conn, comment.author), base_url
            )
        return body

    def comment(
        self, identity: Identity | None, key: RepoKey, num: int, text: str, base_url: str
    ) -> dict[str, Any]:
        user = self._require_user(identity)
        if not text.strip():
            raise BadRequest("A comment cannot be empty.")
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            event = self.hub.discussions.add_event(
                conn,
                discussion,
                "comment",
                user.user.name,
                comment_data(text, user.user.name, user.user.id, now),
                now,
            )
            queued = self.hub.emit(
                conn,
                repo,
                "discussion",
                "discussion.comment",
                "create",
                self._payload(conn, repo, discussion, base_url, event),
            )
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"newMessage": view}

    def _may_moderate(self, identity: Identity, repo: Repo, discussion: Discussion) -> bool:
        return identity.can_write(repo.namespace) or identity.user.name == discussion.author

    def rename(
        self, identity: Identity | None, key: RepoKey, num: int, title: str, base_url: str
    ) -> dict[str, Any]:
        user = self._require_user(identity)
        title = title.strip()
        if not 3 <= len(title) <= 200:
            raise BadRequest("A discussion title must have between 3 and 200 characters.")
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            if not self._may_moderate(user, repo, discussion):
                raise Forbidden("Only the author or the repo's owners can rename this discussion.")
            event = self.hub.discussions.add_event(
                conn, discussion, "title-change", user.user.name, {"from": discussion.title, "to": title}, now
            )
            discussion = self.hub.discussions.update(conn, discussion, title=title)
            queued = self._emit_discussion_update(conn, repo, discussion, base_url)
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"newTitle": view}

    def change_status(
        self,
        identity: Identity | None,
        key: RepoKey,
        num: int,
        status: str,
        comment: str | None,
        base_url: str,
    ) -> dict[str, Any]:
        user = self._require_user(identity)
        if status not in ("open", "closed"):
            raise BadRequest("A discussion's status can be set to 'open' or 'closed'.")
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            if not self._may_moderate(user, repo, discussion):
                raise Forbidden("Only the author or the repo's owners can change this discussion's status.")
            if discussion.status == "merged":
                raise BadRequest("A merged pull request cannot change status.")
            if comment:
                self.hub.discussions.add_event(
                    conn,
                    discussion,
                    "comment",
                    user.user.name,
                    comment_data(comment, user.user.name, user.user.id, now),
                    now,
                )
            event = self.hub.discussions.add_event(
                conn, discussion, "status-change", user.user.name, {"status": status}, now
            )
            discussion = self.hub.discussions.update(conn, discussion, status=status)
            queued = self._emit_discussion_update(conn, repo, discussion, base_url)
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"newStatus": view}

    def _comment_event(self, conn: sqlite3.Connection, discussion: Discussion, comment_id: str) -> Event:
        event = self.hub.discussions.event(conn, discussion, comment_id)
        if event is None or event.type != "comment":
            raise NotFound(f"Comment {comment_id} not found in discussion #{discussion.num}.")
        return event

    def _emit_discussion_update(
        self, conn: sqlite3.Connection, repo: Repo, discussion: Discussion, base_url: str
    ) -> int:
        """A discussion's rename, status change or merge, as the Hub reports it: `discussion` / `update`."""
        return self.hub.emit(
            conn, repo, "discussion", "discussion", "update", self._payload(conn, repo, discussion, base_url)
        )

    def _emit_comment_update(
        self, conn: sqlite3.Connection, repo: Repo, discussion: Discussion, event: Event, base_url: str
    ) -> int:
        """The Hub reports every edit and hide as `discussion.comment` / `update` (hidden: no content)."""
        return self.hub.emit(
            conn,
            repo,
            "discussion",
            "discussion.comment",
            "update",
            self._payload(conn, repo, discussion, base_url, event),
        )

    def edit_comment(
        self, identity: Identity | None, key: RepoKey, num: int, comment_id: str, content: str, base_url: str
    ) -> dict[str, Any]:
        user = self._require_user(identity)
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            event = self._comment_event(conn, discussion, comment_id)
            if event.author != user.user.name:
                raise Forbidden("Only a comment's author can edit it.")
            if event.data.get("hidden"):
                raise BadRequest("A hidden comment cannot be edited.")
            event = self.hub.discussions.replace_event_data(
                conn, event, edited_comment_data(event.data, content, user.user.name, user.user.id, now)
            )
            queued = self._emit_comment_update(conn, repo, discussion, event, base_url)
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"updatedComment": view}

    def hide_comment(
        self, identity: Identity | None, key: RepoKey, num: int, comment_id: str, base_url: str
    ) -> dict[str, Any]:
        user = self._require_user(identity)
        _, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.readable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            event = self._comment_event(conn, discussion, comment_id)
            if event.author != user.user.name and not user.can_write(repo.namespace):
                raise Forbidden("Only a comment's author or the repo's owners can hide it.")
            event = self.hub.discussions.replace_event_data(
                conn, event, hidden_comment_data(event.data, user.user.name, user.user.id, now)
            )
            queued = self._emit_comment_update(conn, repo, discussion, event, base_url)
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"updatedComment": view}

    def merge(
        self, identity: Identity | None, key: RepoKey, num: int, comment: str | None, base_url: str
    ) -> dict[str, Any]:
        """Merge a PR into its target branch: fast-forward, or a merge commit when the target moved.

        Raises:
            BadRequest: not an open PR. Conflict: the PR and the target changed the same file differently.
        """
        user = self._require_user(identity)
        moment, now = self.hub.now()
        with self.hub.db.write() as conn:
            repo = self.hub.writable_repo(conn, user, key.type, key.namespace, key.name)
            discussion = self._discussion(conn, repo, num)
            if not discussion.is_pr or discussion.status not in ("open", "draft"):
                raise BadRequest(f"#{num} is not an open pull request.")
            target = discussion.target_ref or "refs/heads/main"
            target_head = self.hub.repos.ref(conn, repo, target)
            pr_head = self.hub.repos.ref(conn, repo, discussion.pr_ref)
            if target_head is None or pr_head is None or discussion.base_commit is None:
                raise BadRequest(f"Pull request #{num} has lost its branch and cannot be merged.")
            base = self.hub.repos.files(conn, repo, discussion.base_commit)
            ours = self.hub.repos.files(conn, repo, target_head)
            theirs = self.hub.repos.files(conn, repo, pr_head)
            merged = dict(ours)
            conflicts = []
            for path in set(base) | set(theirs):
                if base.get(path) == theirs.get(path):
                    continue  # untouched by the PR
                if base.get(path) != ours.get(path) and ours.get(path) != theirs.get(path):
                    conflicts.append(path)
                elif path in theirs:
                    merged[path] = theirs[path]
                else:
                    merged.pop(path, None)
            if conflicts:
                raise Conflict(f"Cannot merge #{num}: conflicting changes to {', '.join(sorted(conflicts))}.")
            commit = self.hub.repos.write_commit(
                conn,
                repo,
                (target_head, pr_head),
                merged,
                author=user.user.name,
                title=f"Merge refs/pr/{num}: {discussion.title}",
                message=comment or "",
                moment=moment,
                now=now,
            )
            self.hub.repos.set_ref(conn, repo, target, commit.oid)
            if comment:
                self.hub.discussions.add_event(
                    conn,
                    discussion,
                    "comment",
                    user.user.name,
                    comment_data(comment, user.user.name, user.user.id, now),
                    now,
                )
            event = self.hub.discussions.add_event(
                conn, discussion, "status-change", user.user.name, {"status": "merged"}, now
            )
            discussion = self.hub.discussions.update(
                conn, discussion, status="merged", merge_commit=commit.oid
            )
            owner_id = self.hub.account_id(conn, repo.namespace)
            queued = self.hub.emit(
                conn,
                repo,
                "repo",
                "repo.content",
                "update",
                {
                    "repo": repo_payload(
                        repo, owner_id, base_url, head_sha=self.hub.repos.ref(conn, repo, "refs/heads/main")
                    ),
                    "updatedRefs": [{"ref": target, "oldSha": target_head, "newSha": commit.oid}],
                },
            )
            queued += self._emit_discussion_update(conn, repo, discussion, base_url)
            view = self._event_view(conn, event)
        if queued:
            self.hub.outbox_written()
        return {"newStatus": view}
