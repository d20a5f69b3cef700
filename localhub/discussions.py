"""Discussions and pull requests: a numbered thread per repo and its ordered events."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from localhub.accounts import new_object_id

DiscussionStatus = Literal["open", "closed", "merged", "draft"]
EventType = Literal["comment", "status-change", "title-change", "commit"]


@dataclass(frozen=True)
class Discussion:
    pk: int
    id: str
    repo_pk: int
    num: int
    title: str
    author: str
    is_pr: bool
    status: DiscussionStatus
    created_at: str
    target_ref: str | None
    base_commit: str | None
    merge_commit: str | None

    @property
    def pr_ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass(frozen=True)
class Event:
    id: str
    type: EventType
    author: str
    created_at: str
    data: dict[str, Any]


def _discussion(row: sqlite3.Row) -> Discussion:
    return Discussion(
        pk=row["pk"],
        id=row["id"],
        repo_pk=row["repo_pk"],
        num=row["num"],
        title=row["title"],
        author=row["author"],
        is_pr=bool(row["is_pr"]),
        status=row["status"],
        created_at=row["created_at"],
        target_ref=row["target_ref"],
        base_commit=row["base_commit"],
        merge_commit=row["merge_commit"],
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        author=row["author"],
        created_at=row["created_at"],
        data=json.loads(row["data"]),
    )


class Discussions:
    """Reads and writes discussions through the connection of the caller's transaction."""

    def create(
        self,
        conn: sqlite3.Connection,
        repo_pk: int,
        *,
        title: str,
        author: str,
        is_pr: bool,
        status: DiscussionStatus,
        now: str,
        target_ref: str | None = None,
        base_commit: str | None = None,
    ) -> Discussion:
        row = conn.execute(
            "SELECT COALESCE(MAX(num), 0) + 1 AS n FROM discussions WHERE repo_pk = ?", (repo_pk,)
        ).fetchone()
        num = int(row["n"])
        conn.execute(
            "INSERT INTO discussions (id, repo_pk, num, title, author, is_pr, status, created_at, target_ref, base_commit) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new_object_id(), repo_pk, num, title, author, int(is_pr), status, now, target_ref, base_commit),
        )
        found = self.get(conn, repo_pk, num)
        assert found is not None
        return found

    def get(self, conn: sqlite3.Connection, repo_pk: int, num: int) -> Discussion | None:
        row = conn.execute(
            "SELECT * FROM discussions WHERE repo_pk = ? AND num = ?", (repo_pk, num)
        ).fetchone()
        return _discussion(row) if row else None

    def of_repo(self, conn: sqlite3.Connection, repo_pk: int) -> list[Discussion]:
        rows = conn.execute(
            "SELECT * FROM discussions WHERE repo_pk = ? ORDER BY num DESC", (repo_pk,)
        ).fetchall()
        return [_discussion(r) for r in rows]

    def update(self, conn: sqlite3.Connection, discussion: Discussion, **fields: object) -> Discussion:
        allowed = {"title", "status", "merge_commit"}
        assert set(fields) <= allowed
        for key, value in fields.items():
            conn.execute(f"UPDATE discussions SET {key} = ? WHERE pk = ?", (value, discussion.pk))
        found = self.get(conn, discussion.repo_pk, discussion.num)
        assert found is not None
        return found

    def add_event(
        self,
        conn: sqlite3.Connection,
        discussion: Discussion,
        type_: EventType,
        author: str,
        data: dict[str, Any],
        now: str,
    ) -> Event:
        event_id = new_object_id()
        conn.execute(
            "INSERT INTO events (id, discussion_pk, type, author, created_at, data) VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, discussion.pk, type_, author, now, json.dumps(data)),
        )
        return Event(id=event_id, type=type_, author=author, created_at=now, data=data)

    def events(self, conn: sqlite3.Connection, discussion: Discussion) -> list[Event]:
        rows = conn.execute(
            "SELECT * FROM events WHERE discussion_pk = ? ORDER BY seq", (discussion.pk,)
        ).fetchall()
        return [_event(r) for r in rows]

    def event(self, conn: sqlite3.Connection, discussion: Discussion, event_id: str) -> Event | None:
        row = conn.execute(
            "SELECT * FROM events WHERE discussion_pk = ? AND id = ?", (discussion.pk, event_id)
        ).fetchone()
        return _event(row) if row else None

    def replace_event_data(self, conn: sqlite3.Connection, event: Event, data: dict[str, Any]) -> Event:
        conn.execute("UPDATE events SET data = ? WHERE id = ?", (json.dumps(data), event.id))
        return Event(
            id=event.id, type=event.type, author=event.author, created_at=event.created_at, data=data
        )
