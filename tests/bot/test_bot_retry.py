"""Living within the Hub's limits, unit by unit: retry waits and caps, the status-comment budget,
the whoami cache (against a localhub that allows one whoami per account per hour)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from botkit import ALICE_TOKEN, BOT, BOT_TOKEN
from huggingface_hub.errors import HfHubHTTPError

from bot.budget import AFTER_QUEUE, COMMENTS_PER_JOB, CommentBudget
from bot.errors import HubError
from bot.hub import Hub
from bot.retry import RetryPolicy, hinted_wait, with_retries
from bot.whoami import WhoamiCache
from localhub.config import RateLimit
from localhub.server import LocalHubServer
from localhub.testing import run_localhub


def refused(status: int, headers: dict[str, str] | None = None) -> HfHubHTTPError:
    request = httpx.Request("POST", "http://hub.test/api/x")
    return HfHubHTTPError(f"HTTP {status}", response=httpx.Response(status, headers=headers, request=request))


def flaky(answers: list[HfHubHTTPError | str]) -> Callable[[], str]:
    """A call that raises or returns the given answers in turn."""

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, HfHubHTTPError):
            raise answer
        return answer

    return call


def test_the_servers_hint_is_read_from_every_header_the_hub_may_send() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert hinted_wait({"Retry-After": "17"}) == 17
    assert hinted_wait({"retry-after": format_datetime(now + timedelta(seconds=30), usegmt=True)}, now) == 30
    assert (
        hinted_wait({"RateLimit": '"api";r=0;t=55', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'})
        == 55
    )
    assert hinted_wait({"RateLimit-Reset": "9"}) == 9
    assert hinted_wait({"Retry-After": "5", "RateLimit": '"api";r=0;t=55'}) == 5  # Retry-After wins
    assert hinted_wait({"X-Other": "1"}) is None


def test_429_and_5xx_are_retried_with_the_hint_or_a_growing_jittered_backoff() -> None:
    slept: list[float] = []
    policy = RetryPolicy(tries=6, base_s=2.0, sleep=slept.append, jitter=lambda: 0.5)
    answers: list[HfHubHTTPError | str] = [
        refused(429, {"Retry-After": "3"}),
        refused(503),
        refused(502),
        refused(429, {"RateLimit": '"api";r=0;t=40'}),
        "done",
    ]
    assert with_retries(flaky(answers), policy, "test") == "done"
    # hint + jitter; then 2 * 2**(n-1) scaled by (0.5 + 0.5 * jitter)
    assert slept == [3.5, 4 * 0.75, 8 * 0.75, 40.5]


def test_other_errors_are_not_retried_and_the_caps_hold() -> None:
    slept: list[float] = []
    policy = RetryPolicy(tries=3, sleep=slept.append, jitter=lambda: 0.0)
    with pytest.raises(HfHubHTTPError) as caught:
        with_retries(flaky([refused(403), "never"]), policy, "test")
    assert caught.value.response.status_code == 403 and slept == []
    with pytest.raises(HfHubHTTPError):
        with_retries(flaky([refused(500)] * 3 + ["never"]), policy, "test")
    assert len(slept) == 2  # three tries, two waits
    slept.clear()
    short = RetryPolicy(tries=6, budget_s=100, sleep=slept.append, jitter=lambda: 0.0)
    with pytest.raises(HfHubHTTPError):  # the second wait would pass the budget: it is not made
        with_retries(flaky([refused(429, {"Retry-After": "60"})] * 2 + ["never"]), short, "test")
    assert slept == [60]


def test_a_jobs_comment_writes_stay_within_the_budget_and_the_last_word_fits() -> None:
    budget = CommentBudget()
    budget.queued("j", 20)
    shown = [p for p in range(19, 0, -1) if budget.take_position("j", p)]
    assert shown == [10, 5, 2]  # halving, then the budget keeps the rest for the run
    assert budget.spent("j") == COMMENTS_PER_JOB - AFTER_QUEUE
    assert budget.take("j", reserve=1)  # started
    assert all(budget.take("j", reserve=2) for _ in range(3))  # 25/50/75 %
    assert budget.take("j", reserve=1)  # publishing
    assert not budget.take("j", reserve=1)  # nothing more but the last word
    assert budget.take("j") and budget.spent("j") == COMMENTS_PER_JOB
    assert not budget.take("j")


def test_next_in_line_is_always_shown_when_the_budget_allows() -> None:
    budget = CommentBudget()
    budget.queued("k", 3)
    assert not budget.take_position("k", 2)  # not half of 3
    assert budget.take_position("k", 1)
    assert not budget.take_position("k", 1)  # unchanged


@pytest.fixture
def strict_hub(tmp_path: Path) -> Iterator[LocalHubServer]:
    with run_localhub(
        tmp_path / "hub", rate_limits={"whoami": RateLimit(requests=1, window_seconds=3600)}
    ) as hub:
        hub.add_user(BOT, BOT_TOKEN)
        hub.add_user("alice", ALICE_TOKEN)
        yield hub


def test_whoami_is_asked_once_per_token_for_many_submits(strict_hub: LocalHubServer) -> None:
    hub = Hub(strict_hub.endpoint, BOT_TOKEN)
    for _ in range(20):  # as the Space confirms a signed-in user's token on each submit
        assert hub.as_user(ALICE_TOKEN).whoami() == "alice"
        assert hub.whoami() == BOT
    assert hub.account().id  # the id came with the name


def test_whoami_is_asked_again_once_its_answer_is_old(strict_hub: LocalHubServer) -> None:
    now = [0.0]
    hub = Hub(strict_hub.endpoint, ALICE_TOKEN, whoami_cache=WhoamiCache(ttl_s=60, clock=lambda: now[0]))
    assert hub.whoami() == "alice"
    now[0] = 59
    assert hub.whoami() == "alice"
    now[0] = 61  # asked again: the strict hub allows one an hour, so this one is refused
    with pytest.raises(HubError, match="HTTP 429"):
        hub.whoami()
