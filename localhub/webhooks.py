"""Webhooks: subscriptions, the Hub's v3 payloads, and delivery from a background thread.

Deliveries are written to SQLite in the same transaction as the change they report (an
outbox), so a commit and its notification land together and a delivery survives a restart.
A single worker thread posts them in order and records every attempt in the delivery log
(`LocalHub.deliveries()`). As on the Hub, a failed delivery is not retried (unless
`webhook_retry_delays` asks for it) but can be replayed by hand (`LocalHub.replay_delivery`),
and a webhook gets at most `webhook_daily_limit` deliveries per 24 hours: the rest are
recorded as ``dropped`` and never sent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import httpx

from localhub.accounts import new_object_id
from localhub.config import HubConfig
from localhub.db import Database, iso, utc_now
from localhub.discussions import Discussion, Event
from localhub.errors import BadRequest, NotFound
from localhub.repos import Repo

logger = logging.getLogger(__name__)

WatchKind = Literal["model", "dataset", "space", "user", "org"]
Domain = Literal["repo", "discussion"]
DOMAINS: tuple[Domain, ...] = get_args(Domain)
DeliveryStatus = Literal["pending", "delivered", "failed", "dropped"]


@dataclass(frozen=True)
class WatchedItem:
    type: WatchKind
    name: str

    @classmethod
    def parse(cls, spec: str) -> WatchedItem:
        """Parse ``model:org/name``, ``dataset:...``, ``space:...``, ``user:name`` or ``org:name``."""
        kind, sep, name = spec.partition(":")
        if not sep or kind not in get_args(WatchKind) or not name:
            raise BadRequest(
                f"Invalid watch {spec!r}: use model:NS/NAME, dataset:NS/NAME, space:NS/NAME, user:NAME or org:NAME."
            )
        return cls(type=kind, name=name)  # type: ignore[arg-type]

    def covers(self, repo: Repo) -> bool:
        if self.type in ("user", "org"):
            return repo.namespace == self.name
        return self.type == repo.type and self.name == repo.repo_id


@dataclass(frozen=True)
class Webhook:
    id: str
    owner: str | None
    url: str
    secret: str | None
    watched: tuple[WatchedItem, ...]
    domains: tuple[Domain, ...]
    disabled: bool
    created_at: str

    def wants(self, repo: Repo, domain: Domain) -> bool:
        return not self.disabled and domain in self.domains and any(w.covers(repo) for w in self.watched)


@dataclass(frozen=True)
class Delivery:
    """One payload for one webhook and what became of it."""

    id: int
    webhook_id: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    response_status: int | None
    error: str | None
    created_at: str
    updated_at: str


def _webhook(row: sqlite3.Row) -> Webhook:
    return Webhook(
        id=row["id"],
        owner=row["owner"],
        url=row["url"],
        secret=row["secret"],
        watched=tuple(WatchedItem(**w) for w in json.loads(row["watched"])),
        domains=tuple(json.loads(row["domains"])),
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
    )


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        webhook_id=row["webhook_id"],
        payload=json.loads(row["payload"]),
        status=row["status"],
        attempts=row["attempts"],
        response_status=row["response_status"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# Payload pieces, in the field names and shapes of the Hub's v3 webhooks (see huggingface_hub._webhooks_payload).


def repo_payload(repo: Repo, owner_id: str, base_url: str, head_sha: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": repo.type,
        "name": repo.repo_id,
        "id": repo.id,
        "private": repo.private,
        "url": {"web": f"{base_url}/{repo.web_path}", "api": f"{base_url}/api/{repo.type}s/{repo.repo_id}"},
        "owner": {"id": owner_id},
    }
    if head_sha is not None:
        data["headSha"] = head_sha
    if repo.type == "space":
        data["subdomain"] = f"{repo.namespace}-{repo.name}".lower().replace("_", "-").replace(".", "-")
    return data


def discussion_payload(repo: Repo, discussion: Discussion, author_id: str, base_url: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": discussion.id,
        "num": discussion.num,
        "title": discussion.title,
        "isPullRequest": discussion.is_pr,
        "status": discussion.status,
        "author": {"id": author_id},
        "url": {
            "web": f"{base_url}/{repo.web_path}/discussions/{discussion.num}",
            "api": f"{base_url}/api/{repo.type}s/{repo.repo_id}/discussions/{discussion.num}",
        },
        "pinned": False,
    }
    if discussion.is_pr:
        data["changes"] = {"base": discussion.target_ref or "refs/heads/main"}
        if discussion.merge_commit:
            data["changes"]["mergeCommitId"] = discussion.merge_commit
    return data


def comment_payload(
    repo: Repo, discussion: Discussion, event: Event, author_id: str, base_url: str
) -> dict[str, Any]:
    hidden = bool(event.data.get("hidden"))
    data: dict[str, Any] = {
        "id": event.id,
        "author": {"id": author_id},
        "hidden": hidden,
        "url": {"web": f"{base_url}/{repo.web_path}/discussions/{discussion.num}#{event.id}"},
    }
    if not hidden:  # the Hub leaves a hidden comment's content out
        data["content"] = event.data["latest"]["raw"]
    return data


class WebhookStore:
    """Subscriptions and the delivery log, through the connection of the caller's transaction."""

    def add(
        self,
        conn: sqlite3.Connection,
        *,
        url: str,
        secret: str | None,
        watched: list[WatchedItem],
        domains: list[Domain],
        owner: str | None,
        now: str,
    ) -> Webhook:
        if not url.startswith(("http://", "https://")):
            raise BadRequest(f"Invalid webhook url {url!r}: it must start with http:// or https://.")
        if not watched:
            raise BadRequest("A webhook must watch at least one repo, user or org.")
        bad = [d for d in domains if d not in DOMAINS]
        if bad or not domains:
            raise BadRequest(f"Invalid webhook domains {domains!r}: use some of {list(DOMAINS)}.")
        webhook_id = new_object_id()
        conn.execute(
            "INSERT INTO webhooks (id, owner, url, secret, watched, domains, disabled, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
            (
                webhook_id,
                owner,
                url,
                secret,
                json.dumps([w.__dict__ for w in watched]),
                json.dumps(domains),
                now,
            ),
        )
        found = self.get(conn, webhook_id)
        assert found is not None
        return found

    def get(self, conn: sqlite3.Connection, webhook_id: str) -> Webhook | None:
        row = conn.execute("SELECT * FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
        return _webhook(row) if row else None

    def all(self, conn: sqlite3.Connection, owner: str | None = None) -> list[Webhook]:
        if owner is None:
            rows = conn.execute("SELECT * FROM webhooks ORDER BY created_at, id").fetchall()
        else:
            rows = conn.execute(
                "SELECT * FROM webhooks WHERE owner = ? ORDER BY created_at, id", (owner,)
            ).fetchall()
        return [_webhook(r) for r in rows]

    def update(
        self,
        conn: sqlite3.Connection,
        webhook: Webhook,
        *,
        url: str | None = None,
        secret: str | None = None,
        watched: list[WatchedItem] | None = None,
        domains: list[Domain] | None = None,
        disabled: bool | None = None,
    ) -> Webhook:
        if url is not None:
            conn.execute("UPDATE webhooks SET url = ? WHERE id = ?", (url, webhook.id))
        if secret is not None:
            conn.execute("UPDATE webhooks SET secret = ? WHERE id = ?", (secret, webhook.id))
        if watched is not None:
            conn.execute(
                "UPDATE webhooks SET watched = ? WHERE id = ?",
                (json.dumps([w.__dict__ for w in watched]), webhook.id),
            )
        if domains is not None:
            conn.execute("UPDATE webhooks SET domains = ? WHERE id = ?", (json.dumps(domains), webhook.id))
        if disabled is not None:
            conn.execute("UPDATE webhooks SET disabled = ? WHERE id = ?", (int(disabled), webhook.id))
        found = self.get(conn, webhook.id)
        assert found is not None
        return found

    def delete(self, conn: sqlite3.Connection, webhook: Webhook) -> None:
        conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook.id,))

    def enqueue(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        domain: Domain,
        scope: str,
        action: str,
        body: dict[str, Any],
        now: str,
        *,
        daily_limit: int | None = None,
        day_ago: str | None = None,
    ) -> int:
        """Queue `body` (plus `event` and `webhook`) for every webhook that watches `repo` in `domain`.

        A webhook that has had `daily_limit` deliveries since `day_ago` gets a ``dropped`` one instead.
        """
        queued = 0
        for webhook in self.all(conn):
            if not webhook.wants(repo, domain) or (repo.private and not self._may_see(conn, webhook, repo)):
                continue
            payload = {
                "event": {"action": action, "scope": scope},
                **body,
                "webhook": {"id": webhook.id, "version": 3},
            }
            over = (
                daily_limit is not None
                and day_ago is not None
                and self._sent_since(conn, webhook.id, day_ago) >= daily_limit
            )
            conn.execute(
                "INSERT INTO deliveries (webhook_id, payload, status, attempts, next_attempt, error, created_at, "
                "updated_at) VALUES (?, ?, ?, 0, 0, ?, ?, ?)",
                (
                    webhook.id,
                    json.dumps(payload),
                    "dropped" if over else "pending",
                    "the webhook's daily delivery limit is reached" if over else None,
                    now,
                    now,
                ),
            )
            queued += 0 if over else 1
        return queued

    def _sent_since(self, conn: sqlite3.Connection, webhook_id: str, since: str) -> int:
        row = conn.execute(
            "SELECT COUNT(*) AS n FROM deliveries WHERE webhook_id = ? AND status != 'dropped' AND created_at > ?",
            (webhook_id, since),
        ).fetchone()
        return int(row["n"])

    def replay(self, conn: sqlite3.Connection, delivery_id: int) -> Delivery:
        """Send a delivery again (the Hub's manual replay), whatever became of it.

        Raises:
            NotFound: no such delivery.
        """
        row = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        if row is None:
            raise NotFound(f"Delivery {delivery_id} not found.")
        conn.execute(
            "UPDATE deliveries SET status = 'pending', next_attempt = 0 WHERE id = ?", (delivery_id,)
        )
        found = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        return _delivery(found)

    def _may_see(self, conn: sqlite3.Connection, webhook: Webhook, repo: Repo) -> bool:
        """Private repos are reported only to admin webhooks and to members of the repo's namespace."""
        if webhook.owner is None or webhook.owner == repo.namespace:
            return True
        row = conn.execute(
            "SELECT 1 FROM memberships WHERE org = ? AND user = ?", (repo.namespace, webhook.owner)
        ).fetchone()
        return row is not None

    def deliveries(self, conn: sqlite3.Connection, webhook_id: str | None = None) -> list[Delivery]:
        if webhook_id is None:
            rows = conn.execute("SELECT * FROM deliveries ORDER BY id").fetchall()
        else:
            rows = conn.execute(
                "SELECT * FROM deliveries WHERE webhook_id = ? ORDER BY id", (webhook_id,)
            ).fetchall()
        return [_delivery(r) for r in rows]


class WebhookDispatcher:
    """Posts queued deliveries from one background thread, so no request ever waits on a receiver."""

    def __init__(self, db: Database, config: HubConfig, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._config = config
        self._clock = clock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with (
            self._db.write() as conn
        ):  # what a previous run left pending is due now, not at its old retry time
            conn.execute("UPDATE deliveries SET next_attempt = 0 WHERE status = 'pending'")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="localhub-webhooks", daemon=True)
        self._thread.start()
        self._wake.set()  # deliveries left pending by a previous run

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        with httpx.Client(timeout=self._config.webhook_timeout_seconds, follow_redirects=False) as client:
            while not self._stopping.is_set():
                self._wake.clear()
                wait = self._deliver_due(client)
                self._wake.wait(wait)

    def _deliver_due(self, client: httpx.Client) -> float:
        """Attempt every due delivery; return how long to sleep before the next one is due."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT d.id, d.payload, d.attempts, w.url, w.secret FROM deliveries d "
                "JOIN webhooks w ON w.id = d.webhook_id WHERE d.status = 'pending' AND d.next_attempt <= ? ORDER BY d.id",
                (self._clock(),),
            ).fetchall()
        for row in rows:
            if self._stopping.is_set():
                return 0.0
            self._attempt(client, row)
        with self._db.read() as conn:
            nxt = conn.execute(
                "SELECT MIN(next_attempt) AS t FROM deliveries WHERE status = 'pending'"
            ).fetchone()["t"]
        return 1.0 if nxt is None else max(0.0, min(1.0, nxt - self._clock()))

    def _attempt(self, client: httpx.Client, row: sqlite3.Row) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "localhub-webhooks/1"}
        if row["secret"]:
            headers["X-Webhook-Secret"] = row["secret"]
        status_code: int | None = None
        error: str | None = None
        try:
            response = client.post(row["url"], content=row["payload"].encode(), headers=headers)
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"receiver answered HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = row["attempts"] + 1
        delays = self._config.webhook_retry_delays
        if error is None:
            status, next_attempt = "delivered", 0.0
        elif attempts > len(delays):
            status, next_attempt = "failed", 0.0
        else:
            status, next_attempt = "pending", self._clock() + delays[attempts - 1]
        if error:
            logger.info("webhook delivery %s attempt %d failed: %s", row["id"], attempts, error)
        with self._db.write() as conn:
            conn.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, response_status = ?, error = ?, next_attempt = ?, "
                "updated_at = ? WHERE id = ?",
                (status, attempts, status_code, error, next_attempt, iso(utc_now()), row["id"]),
            )
