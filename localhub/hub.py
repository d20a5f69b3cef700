"""`LocalHub`: one data folder and the rules shared by every use case.

It owns the stores, the clock and the signing key; the services (repos, commits,
discussions) and the admin verbs used by the CLI and by tests go through it. Nothing
here knows HTTP.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from localhub.accounts import Account, Accounts, Identity, TokenRole
from localhub.blobs import BlobStore
from localhub.config import HubConfig
from localhub.db import Clock, Database, iso, utc_now
from localhub.discussions import Discussions
from localhub.errors import Forbidden, GatedRepo, RepoNotFound, RevisionNotFound, Unauthorized
from localhub.lfs import LinkSigner, load_or_create_key
from localhub.ratelimits import RateLimiter
from localhub.repos import Commit, Repo, Repos
from localhub.spaces import SpaceRuntimes
from localhub.webhooks import DOMAINS, Delivery, Domain, WatchedItem, Webhook, WebhookStore


class LocalHub:
    """The state of one localhub data folder and the checks every request goes through."""

    def __init__(self, config: HubConfig, clock: Clock = utc_now) -> None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.db = Database(config.data_dir / "hub.sqlite")
        self.blobs = BlobStore(config.data_dir)
        self.signer = LinkSigner(load_or_create_key(config.data_dir))
        self.accounts = Accounts()
        self.repos = Repos()
        self.discussions = Discussions()
        self.webhooks = WebhookStore()
        self.spaces = SpaceRuntimes()  # in memory: a stand-in, see localhub.spaces
        self._clock = clock
        self.limits = RateLimiter(config.rate_limits, lambda: self._clock().timestamp())
        self._outbox_listeners: list[Callable[[], None]] = []

    # time and notifications

    def now(self) -> tuple[datetime, str]:
        moment = self._clock()
        return moment, iso(moment)

    def on_outbox(self, listener: Callable[[], None]) -> None:
        """Call `listener` after a transaction queued webhook deliveries (the dispatcher's wake-up)."""
        self._outbox_listeners.append(listener)

    def outbox_written(self) -> None:
        for listener in self._outbox_listeners:
            listener()

    # admin verbs (CLI, tests)

    def add_user(
        self, name: str, token: str | None = None, orgs: Iterable[str] = (), role: TokenRole = "write"
    ) -> Account:
        """Create user `name` (if new), add `token` to it and make it a member of `orgs` (created if new)."""
        _, now = self.now()
        with self.db.write() as conn:
            user = self.accounts.ensure(conn, name, "user", now)
            for org in orgs:
                self.accounts.ensure(conn, org, "org", now)
                self.accounts.add_member(conn, org, name)
            if token is not None:
                self.accounts.add_token(conn, name, token, role, now)
        return user

    def add_org(self, name: str, members: Iterable[str] = ()) -> Account:
        _, now = self.now()
        with self.db.write() as conn:
            org = self.accounts.ensure(conn, name, "org", now)
            for member in members:
                self.accounts.ensure(conn, member, "user", now)
                self.accounts.add_member(conn, name, member)
        return org

    def add_webhook(
        self,
        url: str,
        watch: Iterable[str | WatchedItem],
        secret: str | None = None,
        domains: Iterable[Domain] = DOMAINS,
        owner: str | None = None,
    ) -> Webhook:
        """Subscribe `url` to events of the watched repos (``model:ns/name``) or namespaces (``user:x``)."""
        items = [w if isinstance(w, WatchedItem) else WatchedItem.parse(w) for w in watch]
        _, now = self.now()
        with self.db.write() as conn:
            return self.webhooks.add(
                conn, url=url, secret=secret, watched=items, domains=list(domains), owner=owner, now=now
            )

    def list_webhooks(self) -> list[Webhook]:
        with self.db.read() as conn:
            return self.webhooks.all(conn)

    def replay_delivery(self, delivery_id: int) -> Delivery:
        """Send a delivery again, as the Hub's "replay" button does (it never retries on its own)."""
        with self.db.write() as conn:
            delivery = self.webhooks.replay(conn, delivery_id)
        self.outbox_written()
        return delivery

    def deliveries(self, webhook_id: str | None = None) -> list[Delivery]:
        """The delivery log, oldest first: payload, status, attempts and the receiver's last answer."""
        with self.db.read() as conn:
            return self.webhooks.deliveries(conn, webhook_id)

    # identity and access

    def identify(self, token: str | None) -> Identity | None:
        with self.db.read() as conn:
            return self.accounts.authenticate(conn, token)

    def account_id(self, conn: sqlite3.Connection, name: str) -> str:
        account = self.accounts.get(conn, name)
        return account.id if account else "000000000000000000000000"

    def readable_repo(
        self, conn: sqlite3.Connection, identity: Identity | None, repo_type: str, namespace: str, name: str
    ) -> Repo:
        """The repo, if it exists and `identity` may see it.

        Raises:
            RepoNotFound: it does not exist, or it is private and not `identity`'s (the same answer, on purpose).
        """
        repo = self.repos.get(conn, repo_type, namespace, name)
        if repo is None or (repo.private and (identity is None or not identity.can_see(repo.namespace))):
            raise RepoNotFound(f"{namespace}/{name}")
        return repo

    def writable_repo(
        self, conn: sqlite3.Connection, identity: Identity | None, repo_type: str, namespace: str, name: str
    ) -> Repo:
        """The repo, if `identity` may write to it.

        Raises:
            Unauthorized: no token. RepoNotFound: as for `readable_repo`. Forbidden: someone else's namespace.
        """
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to write to a repository.")
        repo = self.readable_repo(conn, identity, repo_type, namespace, name)
        require_namespace_write(identity, repo.namespace)
        return repo

    def downloadable_repo(
        self, conn: sqlite3.Connection, identity: Identity | None, repo_type: str, namespace: str, name: str
    ) -> Repo:
        """The repo, if `identity` may read its files (gated repos: only their namespace's members).

        Raises:
            RepoNotFound: as for `readable_repo`. GatedRepo: gated and `identity` has no access.
        """
        repo = self.readable_repo(conn, identity, repo_type, namespace, name)
        if repo.gated and (identity is None or not identity.can_see(repo.namespace)):
            raise GatedRepo(
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in."
            )
        return repo

    def resolve(self, conn: sqlite3.Connection, repo: Repo, revision: str) -> Commit:
        """The commit `revision` names in `repo`.

        Raises:
            RevisionNotFound: no branch, tag, PR ref or commit of that name.
        """
        commit = self.repos.resolve(conn, repo, revision)
        if commit is None:
            raise RevisionNotFound(repo.repo_id, revision)
        return commit

    def emit(
        self,
        conn: sqlite3.Connection,
        repo: Repo,
        domain: Domain,
        scope: str,
        action: str,
        body: dict[str, Any],
    ) -> int:
        """Queue a webhook event in the caller's transaction; call `outbox_written` after it commits."""
        moment, now = self.now()
        return self.webhooks.enqueue(
            conn,
            repo,
            domain,
            scope,
            action,
            body,
            now,
            daily_limit=self.config.webhook_daily_limit,
            day_ago=iso(moment - timedelta(days=1)),
        )


def require_namespace_write(identity: Identity, namespace: str) -> None:
    """Raises Forbidden unless `identity` may write in `namespace` (its own, or one of its orgs)."""
    if not identity.can_write(namespace):
        if identity.role != "write":
            raise Forbidden("This token is read-only; use a token with the 'write' role.")
        raise Forbidden(
            f"You don't have the rights to write in the namespace '{namespace}': "
            f"you can write in {', '.join(sorted(identity.namespaces))}."
        )


__all__ = ["LocalHub", "require_namespace_write"]
