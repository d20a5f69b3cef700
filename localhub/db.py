"""SQLite: the schema and the two ways in (a read, a serialised write transaction).

Every method that writes takes the connection of one transaction, so a use case that
touches several tables (a commit that opens a pull request) commits or fails as one.
A connection per transaction keeps threads apart (the server's thread pool, the
webhook worker, an `add-user` run from another process while the server runs).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

Clock = Callable[[], datetime]

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY, id TEXT NOT NULL, kind TEXT NOT NULL, fullname TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS memberships (
    org TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (org, user)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS repos (
    pk INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, type TEXT NOT NULL, namespace TEXT NOT NULL,
    name TEXT NOT NULL, private INTEGER NOT NULL, gated TEXT, sdk TEXT, created_at TEXT NOT NULL,
    UNIQUE (type, namespace, name)
);
CREATE TABLE IF NOT EXISTS commits (
    repo_pk INTEGER NOT NULL, oid TEXT NOT NULL, parents TEXT NOT NULL, tree TEXT NOT NULL,
    author TEXT NOT NULL, title TEXT NOT NULL, message TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (repo_pk, oid)
);
CREATE TABLE IF NOT EXISTS commit_files (
    repo_pk INTEGER NOT NULL, commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, lfs INTEGER NOT NULL, oid TEXT NOT NULL,
    PRIMARY KEY (repo_pk, commit_oid, path)
);
CREATE TABLE IF NOT EXISTS refs (
    repo_pk INTEGER NOT NULL, name TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (repo_pk, name)
);
CREATE TABLE IF NOT EXISTS lfs_objects (
    repo_pk INTEGER NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (repo_pk, sha256)
);
CREATE TABLE IF NOT EXISTS discussions (
    pk INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, repo_pk INTEGER NOT NULL, num INTEGER NOT NULL,
    title TEXT NOT NULL, author TEXT NOT NULL, is_pr INTEGER NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, target_ref TEXT, base_commit TEXT, merge_commit TEXT,
    UNIQUE (repo_pk, num)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, discussion_pk INTEGER NOT NULL,
    type TEXT NOT NULL, author TEXT NOT NULL, created_at TEXT NOT NULL, data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, owner TEXT, url TEXT NOT NULL, secret TEXT, watched TEXT NOT NULL,
    domains TEXT NOT NULL, disabled INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_id TEXT NOT NULL, payload TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL, response_status INTEGER, error TEXT,
    next_attempt REAL NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """The Hub's date format: milliseconds and a Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Database:
    """One SQLite file; opened per transaction so any thread (or process) may use it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.read() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised transaction: all of it lands, or (on any exception) none of it."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
