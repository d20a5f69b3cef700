"""Load: 200 webhook deliveries in bursts, a quarter of them duplicates -> one job per distinct command,
and the listener keeps answering fast (the work is queued, not done in the request)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from botkit import BOT, RECIPE, WEBHOOK_SECRET, BotFactory, World, discussion_payload, merge_command, wait_for


def test_bursts_with_duplicates(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(webhook=False, run_jobs=False, max_jobs_per_user=1000)
    repo = f"{BOT}/requests"
    distinct: list[dict[str, Any]] = []
    merges = 30
    for i in range(merges):  # 30 merge requests (new discussions) ...
        d = world.alice.create_discussion(
            repo, f"load merge {i}", description=merge_command(f"load-{i}", RECIPE)
        )
        distinct.append(discussion_payload(repo, d.num, f"load-{d.num}"))
        for j in range(4):  # ... and 120 comments in them that are not merges
            text = f"@{BOT} status" if j % 2 else f"just chatting {j}"
            c = world.bob.comment_discussion(repo, d.num, text)
            distinct.append(discussion_payload(repo, d.num, f"load-{d.num}", c.id))
    rng = random.Random(5)
    deliveries = distinct + [rng.choice(distinct) for _ in range(50)]  # 200, a quarter duplicates
    rng.shuffle(deliveries)
    assert len(deliveries) == 200

    # Handling is held until every delivery has been answered: a listener that did the work in
    # the request could not answer them all (the client would time out and the test fail).
    handled = threading.Event()
    handle = server.bot.handle

    def held_handle(key: str, payload: dict[str, Any]) -> None:
        handled.wait(120)
        handle(key, payload)

    server.bot.handle = held_handle  # type: ignore[method-assign]

    def post(payload: dict[str, Any]) -> int:
        answer = client.post(server.url, json=payload, headers={"X-Webhook-Secret": WEBHOOK_SECRET})
        return answer.status_code

    results: list[int] = []
    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=20)) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        for burst in range(4):
            results += list(pool.map(post, deliveries[burst * 50 : (burst + 1) * 50]))
            time.sleep(0.2)
    assert all(status in (200, 202) for status in results)
    assert results.count(202) == len(distinct)
    assert server.bot.store.all() == []  # every answer came before any handling
    handled.set()

    wait_for(lambda: server.bot.store.pending() == [], 90, "every delivery handled")
    jobs = server.bot.store.all()
    assert len(jobs) == merges
    assert sorted(j.spec.destination for j in jobs) == sorted(f"{BOT}/load-{i}" for i in range(merges))
