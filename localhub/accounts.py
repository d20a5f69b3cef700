"""Users, organisations and their tokens, and the one rule of who may write where."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Literal

from localhub.errors import BadRequest, Unauthorized

AccountKind = Literal["user", "org"]
TokenRole = Literal["read", "write"]
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Account:
    name: str
    id: str
    kind: AccountKind
    fullname: str
    created_at: str


@dataclass(frozen=True)
class Identity:
    """Who made a request: the user, its organisations and what its token allows."""

    user: Account
    orgs: tuple[Account, ...]
    role: TokenRole

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset({self.user.name, *(org.name for org in self.orgs)})

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and namespace in self.namespaces

    def can_see(self, namespace: str) -> bool:
        return namespace in self.namespaces


def new_object_id() -> str:
    """24 hex characters, like the Hub's (MongoDB) object ids."""
    return secrets.token_hex(12)


def token_digest(token: str) -> str:
    # Only a digest is stored, so the database never holds a usable secret.
    return hashlib.sha256(token.encode()).hexdigest()


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or "--" in name or ".." in name:
        raise BadRequest(
            f"Invalid name {name!r}: use letters, digits, '-', '_' and '.', up to 96 characters."
        )
    return name


def _account(row: sqlite3.Row) -> Account:
    return Account(
        name=row["name"],
        id=row["id"],
        kind=row["kind"],
        fullname=row["fullname"],
        created_at=row["created_at"],
    )


class Accounts:
    """Reads and writes accounts through the connection of the caller's transaction."""

    def get(self, conn: sqlite3.Connection, name: str) -> Account | None:
        row = conn.execute("SELECT * FROM accounts WHERE name = ?", (name,)).fetchone()
        return _account(row) if row else None

    def ensure(self, conn: sqlite3.Connection, name: str, kind: AccountKind, now: str) -> Account:
        """Return the account `name`, creating it as `kind` if it does not exist yet.

        Raises:
            BadRequest: the name is invalid, or it is taken by an account of the other kind.
        """
        existing = self.get(conn, name)
        if existing is not None:
            if existing.kind != kind:
                raise BadRequest(
                    f"{name!r} already exists as {'a user' if existing.kind == 'user' else 'an organization'}."
                )
            return existing
        validate_name(name)
        conn.execute(
            "INSERT INTO accounts (name, id, kind, fullname, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, new_object_id(), kind, name, now),
        )
        account = self.get(conn, name)
        assert account is not None
        return account

    def add_member(self, conn: sqlite3.Connection, org: str, user: str, role: str = "admin") -> None:
        conn.execute(
            "INSERT OR REPLACE INTO memberships (org, user, role) VALUES (?, ?, ?)", (org, user, role)
        )

    def add_token(self, conn: sqlite3.Connection, user: str, token: str, role: TokenRole, now: str) -> None:
        if len(token) < 4:
            raise BadRequest("A token must have at least 4 characters.")
        conn.execute(
            "INSERT OR REPLACE INTO tokens (token_sha256, user, role, created_at) VALUES (?, ?, ?, ?)",
            (token_digest(token), user, role, now),
        )

    def orgs_of(self, conn: sqlite3.Connection, user: str) -> tuple[Account, ...]:
        rows = conn.execute(
            "SELECT a.* FROM memberships m JOIN accounts a ON a.name = m.org WHERE m.user = ? ORDER BY a.name",
            (user,),
        ).fetchall()
        return tuple(_account(r) for r in rows)

    def role_in_org(self, conn: sqlite3.Connection, org: str, user: str) -> str | None:
        row = conn.execute("SELECT role FROM memberships WHERE org = ? AND user = ?", (org, user)).fetchone()
        return row["role"] if row else None

    def authenticate(self, conn: sqlite3.Connection, token: str | None) -> Identity | None:
        """Return who holds `token` (None for an anonymous request).

        Raises:
            Unauthorized: a token was sent but is unknown.
        """
        if not token:
            return None
        row = conn.execute(
            "SELECT t.role, t.created_at AS token_created, a.* FROM tokens t JOIN accounts a ON a.name = t.user "
            "WHERE t.token_sha256 = ?",
            (token_digest(token),),
        ).fetchone()
        if row is None:
            raise Unauthorized(INVALID_TOKEN_MESSAGE)
        user = _account(row)
        return Identity(user=user, orgs=self.orgs_of(conn, user.name), role=row["role"])
