"""Retries of Hub writes: the Hub answers 429 (with ``Retry-After`` / ``RateLimit`` headers) and 5xx,
and huggingface_hub retries only downloads, so every write the bot makes goes through
:func:`with_retries`.

The wait before a new try is the server's hint when it gives one (``Retry-After`` in seconds or as
an HTTP date, else the ``t`` of ``RateLimit: "api";r=0;t=55``, else ``RateLimit-Reset``), otherwise
exponential backoff; both get jitter, so bots that were refused together do not come back together.
A :class:`RetryPolicy` caps the number of tries and the time spent waiting; its ``sleep`` and
``jitter`` are arguments, so tests run without waiting.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from huggingface_hub.errors import HfHubHTTPError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RATELIMIT_T = re.compile(r";\s*t\s*=\s*(\d+)")


@dataclass(frozen=True)
class RetryPolicy:
    """How long a Hub write may keep trying.

    Args:
        tries: attempts in all (the first one included).
        base_s: the first backoff wait when the server gives no hint; doubled at each try.
        max_wait_s: the longest single wait (a hint above it is cut to it).
        budget_s: the most time spent waiting across all tries; a wait that would pass it is not made.
        sleep: how to wait (``time.sleep``; tests pass a recorder).
        jitter: a number in [0, 1) (``random.random``; tests pass a constant).
    """

    tries: int = 6
    base_s: float = 2.0
    max_wait_s: float = 300.0
    budget_s: float = 600.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def once(self) -> RetryPolicy:
        """The same policy with a single try (for writes that are not worth waiting for)."""
        return RetryPolicy(1, self.base_s, self.max_wait_s, self.budget_s, self.sleep, self.jitter)


def status_of(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def hinted_wait(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds the server asks to wait, from ``Retry-After``, ``RateLimit`` or ``RateLimit-Reset``."""
    lowered = {k.lower(): v for k, v in headers.items()}
    value = lowered.get("retry-after", "").strip()
    if value:
        if value.isdigit():
            return float(value)
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())
    found = _RATELIMIT_T.search(lowered.get("ratelimit", ""))
    if found:
        return float(found.group(1))
    reset = lowered.get("ratelimit-reset", "").strip()
    if reset.isdigit():
        return float(reset)
    return None


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Call ``fn`` until it succeeds, retrying 429 and 5xx answers as ``policy`` allows.

    Raises:
        HfHubHTTPError: another status, or the last refusal once the tries or the wait budget are spent.
    """
    waited = 0.0
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except HfHubHTTPError as exc:
            status = status_of(exc)
            if status not in RETRY_STATUSES or attempt == policy.tries:
                raise
            response = getattr(exc, "response", None)
            hint = hinted_wait(getattr(response, "headers", None) or {})
            if hint is not None:
                wait = min(hint, policy.max_wait_s) + policy.jitter()  # up to a second after the reset
            else:
                wait = min(policy.base_s * 2 ** (attempt - 1), policy.max_wait_s)
                wait *= 0.5 + 0.5 * policy.jitter()
            if waited + wait > policy.budget_s:
                raise
            log.info(
                "%s: HTTP %s, try %d of %d again in %.1f s", what, status, attempt + 1, policy.tries, wait
            )
            policy.sleep(wait)
            waited += wait
    raise AssertionError("unreachable: the loop returns or raises")
