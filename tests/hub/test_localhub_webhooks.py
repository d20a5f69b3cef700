"""Webhooks: the Hub's v3 payloads, delivered from a background thread with retries and a log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, WebhookPayload

from localhub.server import LocalHubServer
from localhub.testing import run_localhub

TOKEN = "tok-wendy-123456"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records what it gets; it can fail the first `fail_first` posts."""

    def __init__(
        self, fail_first: int = 0, delay: float = 0.0, port: int = 0, gate: threading.Event | None = None
    ) -> None:
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail_first = fail_first
        self.delay = delay
        self.gate = gate  # when given, every post waits for it before it is answered
        self.calls = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls += 1
                time.sleep(receiver.delay)
                if receiver.gate is not None:
                    receiver.gate.wait(60)
                if receiver.calls <= receiver.fail_first:
                    self.send_response(503)
                else:
                    receiver.received.append((dict(self.headers), json.loads(body)))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for webhook deliveries")
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalHubServer]:
    with run_localhub(tmp_path / "hub", webhook_retry_delays=(0.1, 0.1)) as hub:
        hub.add_user("wendy", TOKEN, orgs=["hooks"])
        hub.add_user("bob", "tok-bob-webhooks")
        yield hub


def test_discussion_comment_and_commit_payloads(server: LocalHubServer) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    bob = HfApi(endpoint=server.endpoint, token="tok-bob-webhooks")
    api.create_repo("hooks/watched")
    api.create_repo("hooks/ignored")
    with Receiver() as receiver:
        webhook = server.add_webhook(receiver.url, ["model:hooks/watched"], secret="s3cret")
        discussion = bob.create_discussion("hooks/watched", "Merge request", description="Please merge.")
        comment = api.comment_discussion("hooks/watched", discussion.num, "On it.")
        commit = api.create_commit(
            "hooks/watched", [CommitOperationAdd("model.txt", b"merged")], commit_message="Add merged model"
        )
        bob.create_discussion("hooks/ignored", "Not watched")
        wait_for(lambda: len(receiver.received) >= 3)
        time.sleep(0.1)
    assert len(receiver.received) == 3
    assert all(headers["X-Webhook-Secret"] == "s3cret" for headers, _ in receiver.received)
    payloads = [body for _, body in receiver.received]
    for body in payloads:
        WebhookPayload.model_validate(body)  # the client's own model of the v3 payload accepts it
        assert body["webhook"] == {"id": webhook.id, "version": 3}
        assert body["repo"]["name"] == "hooks/watched" and body["repo"]["type"] == "model"
        assert body["repo"]["private"] is False and set(body["repo"]["owner"]) == {"id"}
        assert body["repo"]["url"]["web"] == f"{server.endpoint}/hooks/watched"
    created, commented, pushed = payloads
    assert created["event"] == {"action": "create", "scope": "discussion"}
    assert (
        created["discussion"]["num"] == discussion.num and created["discussion"]["title"] == "Merge request"
    )
    assert created["discussion"]["isPullRequest"] is False and created["discussion"]["status"] == "open"
    assert set(created["discussion"]["author"]) == {"id"}
    assert created["discussion"]["url"]["web"].endswith(f"/hooks/watched/discussions/{discussion.num}")
    assert "headSha" not in created["repo"]
    assert commented["event"] == {"action": "create", "scope": "discussion.comment"}
    assert commented["comment"]["id"] == comment.id and commented["comment"]["content"] == "On it."
    assert commented["comment"]["hidden"] is False and set(commented["comment"]["author"]) == {"id"}
    assert commented["discussion"]["author"] == created["discussion"]["author"]  # bob, by id
    assert commented["comment"]["author"] != created["discussion"]["author"]  # wendy
    assert pushed["event"] == {"action": "update", "scope": "repo.content"}
    assert pushed["repo"]["headSha"] == commit.oid
    assert pushed["updatedRefs"][0]["ref"] == "refs/heads/main"
    log = server.deliveries(webhook.id)
    assert [d.status for d in log] == ["delivered"] * 3 and all(d.response_status == 200 for d in log)


def test_failed_deliveries_are_retried_and_logged(server: LocalHubServer) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo("hooks/flaky")
    with Receiver(fail_first=2) as receiver:
        server.add_webhook(receiver.url, ["org:hooks"], secret="x")
        api.create_discussion("hooks/flaky", "Will it arrive?")
        wait_for(lambda: len(receiver.received) == 1)
    delivery = server.deliveries()[-1]
    wait_for(lambda: server.deliveries()[-1].status == "delivered")
    delivery = server.deliveries()[-1]
    assert delivery.attempts == 3 and delivery.response_status == 200


def test_unreachable_receiver_ends_failed(server: LocalHubServer) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo("hooks/lost")
    webhook = server.add_webhook("http://127.0.0.1:9/nothing-listens", ["user:hooks"])
    api.create_discussion("hooks/lost", "Into the void")
    wait_for(lambda: server.deliveries(webhook.id) and server.deliveries(webhook.id)[0].status == "failed")
    failed = server.deliveries(webhook.id)[0]
    assert failed.attempts == 3 and failed.error is not None


def test_delivery_does_not_block_requests(server: LocalHubServer) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo("hooks/slow")
    gate = threading.Event()
    with Receiver(gate=gate) as receiver:
        server.add_webhook(receiver.url, ["model:hooks/slow"])
        asked = threading.Thread(
            target=lambda: [api.create_discussion("hooks/slow", title) for title in ("Quick", "And another")]
        )
        asked.start()
        asked.join(60)  # a hub that delivered inline would still be waiting on the held receiver
        held = not asked.is_alive() and receiver.received == []
        gate.set()
        asked.join()
        assert held, "creating discussions waited for the webhook receiver"
        wait_for(lambda: len(receiver.received) == 2)


def test_webhooks_settings_api(server: LocalHubServer) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    created = api.create_webhook(
        url="http://127.0.0.1:9/x", watched=[{"type": "user", "name": "wendy"}], domains=["repo"], secret="k"
    )
    assert created.url == "http://127.0.0.1:9/x" and created.domains == ["repo"] and not created.disabled
    assert [w.id for w in api.list_webhooks()] == [created.id]
    assert api.get_webhook(created.id).secret == "k"
    updated = api.update_webhook(
        created.id, url="http://127.0.0.1:9/y", watched=[{"type": "org", "name": "hooks"}]
    )
    assert updated.url == "http://127.0.0.1:9/y" and updated.watched[0].type == "org"
    assert api.disable_webhook(created.id).disabled
    assert not api.enable_webhook(created.id).disabled
    api.delete_webhook(created.id)
    assert api.list_webhooks() == []
    other = HfApi(endpoint=server.endpoint, token="tok-bob-webhooks")
    assert other.list_webhooks() == []


def test_pending_deliveries_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    down = Receiver()  # bound, never started, then closed: its port refuses connections
    port = down.server.server_address[1]
    down.server.server_close()
    with run_localhub(data, webhook_retry_delays=(60.0,)) as first:
        first.add_user("wendy", TOKEN, orgs=["hooks"])
        api = HfApi(endpoint=first.endpoint, token=TOKEN)
        api.create_repo("hooks/later")
        first.add_webhook(f"http://127.0.0.1:{port}/hook", ["model:hooks/later"])
        api.create_discussion("hooks/later", "Delivered after a restart")
        wait_for(lambda: bool(first.deliveries()) and first.deliveries()[0].attempts == 1)
        assert first.deliveries()[0].status == "pending"  # next try in a minute; we stop before
    with Receiver(port=port) as receiver, run_localhub(data) as second:
        wait_for(lambda: second.deliveries()[0].status == "delivered")
        assert second.deliveries()[0].attempts == 2
    assert receiver.received[0][1]["discussion"]["title"] == "Delivered after a restart"
