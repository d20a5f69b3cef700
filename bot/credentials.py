"""Signed-in users' tokens, held in this process's memory for the life of their job, never stored.

A merge submitted by a user signed in with Hugging Face (the Space's OAuth) is published to the
user's namespace with the user's own token. The job row says only *that* a user credential is
needed (``JobSpec.credential == "user"``) and where the result goes; the token lives here, keyed
by job id, until the job ends. A restarted process has none: :class:`~bot.service.Bot` moves such
jobs to ``needs_sign_in`` and the Space lets the same user sign in again to resume them, or cancel.

Lifecycle::

    submit (signed in) ── put ──► [job id -> credential] ── worker publishes with it
    job finished / cancelled ── drop          process exits ── gone (job waits: needs_sign_in)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pydantic import SecretStr


@dataclass(frozen=True)
class UserCredential:
    """Who signed in, and their token (a ``SecretStr``: its repr is ``'**********'``)."""

    user: str
    token: SecretStr

    def __post_init__(self) -> None:
        if not self.user or not self.token.get_secret_value():
            raise ValueError("a user credential needs a user name and a token")


class Credentials:
    """Per-job user credentials; one instance per bot, shared by the Space and the worker."""

    def __init__(self) -> None:
        self._by_job: dict[str, UserCredential] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Credentials({len(self._by_job)} held)"

    def put(self, job_id: str, credential: UserCredential) -> None:
        with self._lock:
            self._by_job[job_id] = credential

    def get(self, job_id: str) -> UserCredential | None:
        with self._lock:
            return self._by_job.get(job_id)

    def drop(self, job_id: str) -> None:
        """Forget a job's credential (it ended, or was cancelled)."""
        with self._lock:
            self._by_job.pop(job_id, None)

    def held(self) -> frozenset[str]:
        """Job ids with a credential (for tests and the queue view; never the tokens)."""
        with self._lock:
            return frozenset(self._by_job)
