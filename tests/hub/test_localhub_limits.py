"""localhub is as strict as the Hub: edit/hide/rename events, headSha, the webhooks' daily limit and
no automatic redelivery, 429s with their headers, and card metadata checked on commit."""

from __future__ import annotations

import argparse
import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import parse_ratelimit_headers
from test_localhub_webhooks import Receiver, wait_for

from localhub.cli import main, parse_rate_limit
from localhub.config import RateLimit
from localhub.server import LocalHubServer
from localhub.testing import run_localhub

TOKEN = "tok-lima-123456789"


class FakeClock:
    """The hub's time, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(tmp_path: Path, clock: FakeClock) -> Iterator[LocalHubServer]:
    with run_localhub(
        tmp_path / "hub",
        clock=clock,
        webhook_daily_limit=5,
        rate_limits={
            "comment": RateLimit(requests=2, window_seconds=60),
            "whoami": RateLimit(requests=1, window_seconds=300),
        },
    ) as hub:
        hub.add_user("lima", TOKEN, orgs=["lab"])
        yield hub


@pytest.fixture
def api(server: LocalHubServer) -> HfApi:
    return HfApi(endpoint=server.endpoint, token=TOKEN)


def _events(receiver: Receiver) -> list[tuple[str, str]]:
    return [(p["event"]["scope"], p["event"]["action"]) for _, p in receiver.received]


def test_edits_hides_and_renames_are_delivered_as_updates(server: LocalHubServer, api: HfApi) -> None:
    api.create_repo("lab/talk")
    with Receiver() as receiver:
        server.add_webhook(receiver.url, ["model:lab/talk"], domains=["discussion"])
        d = api.create_discussion("lab/talk", "A question", description="first")
        made = api.comment_discussion("lab/talk", d.num, "hello")
        api.edit_discussion_comment("lab/talk", d.num, made.id, "hello again")
        with pytest.warns(UserWarning, match="irreversible"):
            api.hide_discussion_comment("lab/talk", d.num, made.id)
        api.rename_discussion("lab/talk", d.num, "A better question")
        wait_for(lambda: len(receiver.received) == 5)
    assert _events(receiver) == [
        ("discussion", "create"),
        ("discussion.comment", "create"),
        ("discussion.comment", "update"),
        ("discussion.comment", "update"),
        ("discussion", "update"),
    ]
    edited, hidden, renamed = (p for _, p in receiver.received[2:])
    assert edited["comment"]["id"] == made.id and edited["comment"]["content"] == "hello again"
    assert hidden["comment"]["hidden"] is True and "content" not in hidden["comment"]
    assert renamed["discussion"]["title"] == "A better question"


def test_head_sha_is_mains_head_and_the_moved_ref_is_in_updated_refs(
    server: LocalHubServer, api: HfApi
) -> None:
    api.create_repo("lab/heads")
    main = api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="lab/heads").oid
    with Receiver() as receiver:
        server.add_webhook(receiver.url, ["model:lab/heads"], domains=["repo"])
        pr = api.create_commit(
            "lab/heads", [CommitOperationAdd("b.txt", b"b")], commit_message="on a PR", create_pr=True
        )
        wait_for(lambda: len(receiver.received) == 1)
    payload = receiver.received[0][1]
    assert payload["repo"]["headSha"] == main
    assert payload["updatedRefs"] == [
        {"ref": "refs/pr/1", "oldSha": main, "newSha": pr.oid},
    ]


def test_a_webhook_gets_at_most_its_daily_limit_then_again_a_day_later(
    server: LocalHubServer, api: HfApi, clock: FakeClock
) -> None:
    api.create_repo("lab/busy")
    d = api.create_discussion("lab/busy", "Busy")
    with Receiver() as receiver:
        hook = server.add_webhook(receiver.url, ["model:lab/busy"], domains=["discussion"])
        comment = api.comment_discussion("lab/busy", d.num, "0")
        for i in range(6):
            api.edit_discussion_comment("lab/busy", d.num, comment.id, f"edit {i}")
        wait_for(lambda: all(x.status != "pending" for x in server.deliveries(hook.id)))
        statuses = [x.status for x in server.deliveries(hook.id)]
        assert statuses == ["delivered"] * 5 + ["dropped"] * 2
        assert len(receiver.received) == 5
        clock.advance(24 * 3600 + 1)
        api.edit_discussion_comment("lab/busy", d.num, comment.id, "the next day")
        wait_for(lambda: len(receiver.received) == 6)
    assert receiver.received[-1][1]["comment"]["content"] == "the next day"


def test_a_failed_delivery_is_not_retried_but_can_be_replayed(server: LocalHubServer, api: HfApi) -> None:
    api.create_repo("lab/flaky")
    with Receiver(fail_first=1) as receiver:
        hook = server.add_webhook(receiver.url, ["model:lab/flaky"], domains=["discussion"])
        api.create_discussion("lab/flaky", "Flaky")
        wait_for(lambda: server.deliveries(hook.id)[0].status == "failed")
        (failed,) = server.deliveries(hook.id)
        assert failed.attempts == 1 and receiver.calls == 1 and receiver.received == []
        server.hub.replay_delivery(failed.id)
        wait_for(lambda: server.deliveries(hook.id)[0].status == "delivered")
    assert receiver.calls == 2 and _events(receiver) == [("discussion", "create")]


def test_comments_over_the_limit_get_429_with_rate_limit_headers(
    server: LocalHubServer, api: HfApi, clock: FakeClock
) -> None:
    api.create_repo("lab/limited")
    d = api.create_discussion("lab/limited", "Limited")
    api.comment_discussion("lab/limited", d.num, "one")
    api.comment_discussion("lab/limited", d.num, "two")
    clock.advance(20)
    with pytest.raises(HfHubHTTPError) as caught:
        api.comment_discussion("lab/limited", d.num, "three")
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "40"
    info = parse_ratelimit_headers(response.headers)
    assert info is not None and info.remaining == 0 and info.reset_in_seconds == 40
    assert info.limit == 2 and info.window_seconds == 60
    clock.advance(40)
    api.comment_discussion("lab/limited", d.num, "three, later")


def test_whoami_is_rate_limited_per_account(server: LocalHubServer, api: HfApi) -> None:
    api.whoami()
    with pytest.raises(HfHubHTTPError) as caught:
        api.whoami()
    assert caught.value.response.status_code == 429
    server.add_user("other", "tok-other-123456789")
    assert HfApi(endpoint=server.endpoint, token="tok-other-123456789").whoami()["name"] == "other"


def test_throttle_next_refuses_exactly_that_many_commits(server: LocalHubServer, api: HfApi) -> None:
    api.create_repo("lab/throttled")
    server.hub.limits.throttle_next("commit", times=2, retry_after=7)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as caught:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="lab/throttled")
        assert caught.value.response.status_code == 429
        assert caught.value.response.headers["Retry-After"] == "7"
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="lab/throttled")


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ("license: apache2", '"license" must be one of'),
        ("license: other\nlicense_link: LICENSE", '"license_name" is required'),
        ("license: other\nlicense_name: my-terms", '"license_link" is required'),
        ("license: mit\nbase_model: a/b\nbase_model_relation: blend", '"base_model_relation" must be one of'),
    ],
)
def test_card_metadata_is_checked_like_the_hub(
    server: LocalHubServer, api: HfApi, metadata: str, problem: str
) -> None:
    card = f"---\n{metadata}\n---\n\n# Card\n"
    answer = httpx.post(f"{server.endpoint}/api/validate-yaml", json={"content": card, "repoType": "model"})
    assert answer.status_code == 400 and problem in answer.json()["errors"][0]["message"]
    repo_id = f"lab/card-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id)
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):  # the client asks validate-yaml
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    refused = _commit_without_client_check(server, repo_id, card)  # the commit checks too
    assert refused.status_code == 400 and problem in refused.json()["error"]


def _commit_without_client_check(server: LocalHubServer, repo_id: str, card: str) -> httpx.Response:
    body = "\n".join(
        json.dumps(line)
        for line in (
            {"key": "header", "value": {"summary": "card", "description": ""}},
            {
                "key": "file",
                "value": {
                    "path": "README.md",
                    "content": base64.b64encode(card.encode()).decode(),
                    "encoding": "base64",
                },
            },
        )
    )
    return httpx.post(
        f"{server.endpoint}/api/models/{repo_id}/commit/main",
        content=body.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
    )


def test_valid_card_metadata_passes(server: LocalHubServer, api: HfApi) -> None:
    card = (
        "---\nlicense: other\nlicense_name: my-terms\nlicense_link: LICENSE\n"
        "base_model: [a/b, c/d]\nbase_model_relation: merge\n---\n# Card\n"
    )
    answer = httpx.post(f"{server.endpoint}/api/validate-yaml", json={"content": card, "repoType": "model"})
    assert answer.status_code == 200 and answer.json()["errors"] == []
    api.create_repo("lab/good-card")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="lab/good-card")


def test_cli_sets_rate_limits_and_replays_a_delivery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_rate_limit("comment=10/60") == ("comment", RateLimit(requests=10, window_seconds=60))
    for bad in ("comment", "fork=1/60", "comment=x/60", "commit=0/60"):
        with pytest.raises(argparse.ArgumentTypeError, match="ACTION=N/SECONDS"):
            parse_rate_limit(bad)
    data = tmp_path / "hub"
    with run_localhub(data) as server, Receiver(fail_first=1) as receiver:
        server.add_user("lima", TOKEN)
        hook = server.add_webhook(receiver.url, ["user:lima"], domains=["repo"])
        HfApi(endpoint=server.endpoint, token=TOKEN).create_repo("lima/replayed")
        wait_for(lambda: server.deliveries(hook.id)[0].status == "failed")
        (failed,) = server.deliveries(hook.id)
        assert main(["replay-delivery", "--data", str(data), str(failed.id)]) == 0  # another process
        wait_for(lambda: server.deliveries(hook.id)[0].status == "delivered")
    assert receiver.calls == 2 and "sent again" in capsys.readouterr().out
    assert main(["replay-delivery", "--data", str(data), "999"]) == 2
    assert "Delivery 999 not found" in capsys.readouterr().err
