"""Rate limits, as the Hub applies them to writes and `whoami`: fixed windows per account.

Two sources of 429 answers, both off by default:

- `HubConfig.rate_limits`: at most N requests of an action per account per window;
- `RateLimiter.throttle_next`: the next N requests of an action are refused, whoever sends
  them (fault injection for tests: "the final commit gets 429 twice, then succeeds").
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping

from localhub.config import RateLimit, RateLimitedAction
from localhub.errors import TooManyRequests


class RateLimiter:
    """Counts requests per (action, account) in fixed windows of the hub's clock (seconds)."""

    def __init__(self, limits: Mapping[RateLimitedAction, RateLimit], clock: Callable[[], float]) -> None:
        self._limits = dict(limits)
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}  # -> (window start, count)
        self._forced: dict[str, tuple[int, int]] = {}  # action -> (refusals left, retry-after)

    def throttle_next(self, action: RateLimitedAction, times: int, retry_after: int = 1) -> None:
        """Refuse the next `times` requests of `action` with 429 and ``Retry-After: retry_after``."""
        with self._lock:
            self._forced[action] = (times, retry_after)

    def check(self, action: RateLimitedAction, account: str) -> None:
        """Count one request of `account`.

        Raises:
            TooManyRequests: a forced refusal is pending, or the account's window is full.
        """
        now = self._clock()
        with self._lock:
            left, retry_after = self._forced.get(action, (0, 0))
            if left > 0:
                self._forced[action] = (left - 1, retry_after)
                raise TooManyRequests(action, retry_after=retry_after, limit=1, window_seconds=retry_after)
            limit = self._limits.get(action)
            if limit is None:
                return
            start, count = self._windows.get((action, account), (now, 0))
            if now - start >= limit.window_seconds:
                start, count = now, 0
            if count >= limit.requests:
                wait = max(1, math.ceil(start + limit.window_seconds - now))
                raise TooManyRequests(
                    action,
                    retry_after=wait,
                    limit=limit.requests,
                    window_seconds=math.ceil(limit.window_seconds),
                )
            self._windows[(action, account)] = (start, count + 1)
