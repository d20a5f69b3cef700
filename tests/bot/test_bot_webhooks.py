"""The webhook endpoint: secret checks, payload checks, and de-duplication of the Hub's retries."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import sqlalchemy as sa
from botkit import (
    ALICE_TOKEN,
    BOT,
    RECIPE,
    WEBHOOK_SECRET,
    BotFactory,
    World,
    discussion_payload,
    merge_command,
    wait_for,
)

from bot.webhooks import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    DiscussionEvent,
    Ignored,
    RepoUpdate,
    WebhookRejected,
    check_secret,
    delivery_key,
    parse_event,
)


def test_secret_is_checked_in_constant_time_terms() -> None:
    check_secret("s3cret", "s3cret")
    for received, status in ((None, 401), ("", 401), ("wrong", 403), ("s3cre", 403)):
        try:
            check_secret(received, "s3cret")
        except WebhookRejected as exc:
            assert exc.status == status
        else:
            raise AssertionError("accepted a bad secret")


def test_events_and_keys() -> None:
    p = discussion_payload("o/r", 3, "d1")
    assert parse_event(p) == DiscussionEvent("o/r", 3, None)
    c = discussion_payload("o/r", 3, "d1", "c9")
    assert parse_event(c) == DiscussionEvent("o/r", 3, "c9")
    assert delivery_key(p) != delivery_key(c)
    assert delivery_key(c) == delivery_key(dict(c, webhook={"id": "w2", "version": 3}))
    pushed = {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": "o/p", "headSha": "abc"},
    }
    assert parse_event(pushed) == RepoUpdate("o/p", "abc")
    assert isinstance(parse_event({**pushed, "repo": {"type": "dataset", "name": "o/d"}}), Ignored)
    pr = discussion_payload("o/r", 3, "d1")
    pr["discussion"]["isPullRequest"] = True
    assert isinstance(parse_event(pr), Ignored)


def test_missing_secret_is_401_wrong_is_403_bad_body_is_400(serve_bot: BotFactory) -> None:
    server = serve_bot(webhook=False)
    payload = discussion_payload(f"{BOT}/requests", 1, "d1")
    with httpx.Client(timeout=10) as client:
        assert client.post(server.url, json=payload).status_code == 401
        assert client.post(server.url, json=payload, headers={"X-Webhook-Secret": "nope"}).status_code == 403
        answer = client.post(server.url, content=b"{not json", headers={"X-Webhook-Secret": WEBHOOK_SECRET})
        assert answer.status_code == 400
        answer = client.post(server.url, json={"hello": 1}, headers={"X-Webhook-Secret": WEBHOOK_SECRET})
        assert answer.status_code == 400
        assert client.get(server.url.replace("/webhooks/mergebot", "/health")).json()["bot"] == BOT
    assert server.bot.store.pending() == []


def test_duplicate_deliveries_make_one_job(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(webhook=False, run_jobs=False)
    discussion = world.alice.create_discussion(
        f"{BOT}/requests", "dup", description=merge_command("dup-merge", RECIPE)
    )
    comment = world.alice.comment_discussion(f"{BOT}/requests", discussion.num, f"@{BOT} status")
    opened = discussion_payload(f"{BOT}/requests", discussion.num, f"disc-{discussion.num}")
    commented = discussion_payload(f"{BOT}/requests", discussion.num, f"disc-{discussion.num}", comment.id)
    headers = {"X-Webhook-Secret": WEBHOOK_SECRET}
    with httpx.Client(timeout=10) as client:
        answers = [
            client.post(server.url, json=p, headers=headers)
            for p in (opened, opened, commented, opened, commented)
        ]
    assert [a.status_code for a in answers] == [202, 200, 202, 200, 200]
    assert [a.json()["duplicate"] for a in answers] == [False, True, False, True, True]
    wait_for(lambda: len(server.bot.store.all()) == 1 and server.bot.store.pending() == [], what="the job")

    def bot_replies() -> list[str]:
        events = world.alice.get_discussion_details(f"{BOT}/requests", discussion.num).events
        return [e.content for e in events if getattr(e, "author", None) == BOT]  # type: ignore[attr-defined]

    wait_for(lambda: len(bot_replies()) == 2, what="two replies (status comment and status)")
    assert len(server.bot.store.all()) == 1
    # the same comment seen again by another route (the poll) is not answered twice
    server.bot.on_discussion(f"{BOT}/requests", discussion.num, None)
    server.bot.on_discussion(f"{BOT}/requests", discussion.num, comment.id)
    assert len(server.bot.store.all()) == 1 and len(bot_replies()) == 2
    queue = httpx.get(server.url.replace("/webhooks/mergebot", "/jobs"), timeout=10).json()
    assert [(j["destination"], j["state"], j["requester"]) for j in queue] == [
        (f"{BOT}/dup-merge", "queued", "alice")
    ]


def test_large_deep_or_malformed_bodies_are_refused_at_once(serve_bot: BotFactory) -> None:
    server = serve_bot(webhook=False, run_jobs=False)
    auth = {"X-Webhook-Secret": WEBHOOK_SECRET}
    payload = discussion_payload(f"{BOT}/requests", 1, "d-padded")
    with httpx.Client(timeout=10) as client:
        huge = json.dumps({**payload, "padding": "x" * (MAX_BODY_BYTES + 1)}).encode()
        assert client.post(server.url, content=huge, headers=auth).status_code == 413  # by Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
            yield b'{"padding": "'
            for _ in range(40):
                yield b"x" * 65536
            yield b'"}'

        assert client.post(server.url, content=chunks(), headers=auth).status_code == 413
        assert client.post(server.url, content=b"[" * 200_000, headers=auth).status_code == 400
        deep: object = payload
        for _ in range(MAX_DEPTH):
            deep = {"more": deep}
        answer = client.post(server.url, json=deep, headers=auth)
        assert answer.status_code == 400 and "nested" in answer.json()["error"]
        assert client.post(server.url, content=b'{"event": ', headers=auth).status_code == 400
        # below the limit, a payload is accepted, but only the fields the bot reads are kept
        padded = {**payload, "padding": "y" * 500_000}
        assert client.post(server.url, json=padded, headers=auth).status_code == 202
    with server.bot.store.engine.connect() as conn:
        stored = [r.payload for r in conn.execute(sa.text("SELECT payload FROM mergebot_seen"))]
    assert len(stored) == 1 and "yyyy" not in stored[0] and f"{BOT}/requests" in stored[0]


def test_jobs_shows_private_jobs_only_to_the_operator(world: World, serve_bot: BotFactory) -> None:
    from pydantic import SecretStr

    from bot.credentials import UserCredential
    from bot.jobs import new_guest
    from space.service import SpaceService

    server = serve_bot(webhook=False, run_jobs=False)
    service = SpaceService(server.bot)
    secret = service.submit(
        RECIPE, name="hidden-one", private=True, signed_in=UserCredential("alice", SecretStr(ALICE_TOKEN))
    )
    guest = service.submit(RECIPE, name="open-one", requester=new_guest())
    url = server.url.replace("/webhooks/mergebot", "/jobs")
    with httpx.Client(timeout=10) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": WEBHOOK_SECRET}):
            seen = {j["id"]: j for j in client.get(url, headers=headers).json()}
            assert seen[secret.id]["requester"] is None and seen[secret.id]["destination"] is None
            assert seen[secret.id]["private"] and "alice" not in json.dumps(seen)
            assert seen[guest.id]["requester"] == "guest" and seen[guest.id]["destination"] == f"{BOT}/open-one"
        operator = client.get(url, headers={"Authorization": f"Bearer {WEBHOOK_SECRET}"}).json()
    shown = {j["id"]: j for j in operator}
    assert shown[secret.id]["requester"] == "alice" and shown[secret.id]["destination"] == "alice/hidden-one"
    assert shown[guest.id]["requester"] == guest.spec.requester
