"""Who a token belongs to, asked of the Hub once per token and kept for a while.

The Hub rate-limits ``whoami`` heavily, and the Space confirms a signed-in user's token on every
submit, so answers are cached per token (keyed by its SHA-256, never the token itself) for
``ttl_s`` seconds. One cache is shared by a :class:`~bot.hub.Hub` and every ``as_user`` view of it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    name: str
    id: str


class WhoamiCache:
    """Token -> account, each answer kept ``ttl_s`` seconds of ``clock``."""

    def __init__(self, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[str, tuple[Account, float]] = {}

    def get(self, token: str, ask: Callable[[], Account]) -> Account:
        """The cached account of ``token``, or ``ask()``'s answer (then cached). Errors are not cached."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            found = self._known.get(key)
        if found is not None and found[1] > now:
            return found[0]
        account = ask()
        with self._lock:
            self._known[key] = (account, now + self._ttl)
        return account
