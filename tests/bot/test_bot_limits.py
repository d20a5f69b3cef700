"""The bot within the real Hub's limits, on localhub: status-comment writes per job (each is a
webhook delivery), a rate-limited final commit, and commands the webhook missed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botkit import (
    BOT,
    BOT_TOKEN,
    RECIPE,
    BotFactory,
    World,
    discussion_payload,
    finished_job,
    make_settings,
    merge_command,
    wait_for,
)

from bot.budget import COMMENTS_PER_JOB
from bot.hub import Hub
from bot.jobs import JobSpec
from bot.retry import RetryPolicy
from bot.service import Bot
from bot.webhooks import DiscussionEvent, Ignored, RepoUpdate, parse_event


def test_edits_hides_and_the_bots_own_comments_are_ignored_from_the_payload_alone() -> None:
    mine = discussion_payload(f"{BOT}/requests", 1, "d1", "c1")
    mine["comment"]["author"] = {"id": "bot-id"}
    assert parse_event(mine) == DiscussionEvent(f"{BOT}/requests", 1, "c1")
    assert isinstance(parse_event(mine, own_id="bot-id"), Ignored)
    assert parse_event(mine, own_id="someone-else") == DiscussionEvent(f"{BOT}/requests", 1, "c1")
    edited = discussion_payload(f"{BOT}/requests", 1, "d1", "c2")
    edited["event"]["action"] = "update"
    assert isinstance(parse_event(edited), Ignored)
    hidden = dict(edited, comment={"id": "c2", "author": {"id": "a1"}, "hidden": True})  # no content
    assert isinstance(parse_event(hidden), Ignored)
    pushed: dict[str, Any] = {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": "o/p", "headSha": "main-head"},
    }
    to_main = dict(pushed, updatedRefs=[{"ref": "refs/heads/main", "oldSha": "a", "newSha": "main-head"}])
    assert parse_event(to_main) == RepoUpdate("o/p", "main-head")
    to_pr = dict(pushed, updatedRefs=[{"ref": "refs/pr/3", "oldSha": "a", "newSha": "pr-head"}])
    assert isinstance(parse_event(to_pr), Ignored)  # main did not move: nothing to re-merge


def _status_writes(world: World, webhook_url: str, comment_id: str) -> list[dict[str, Any]]:
    """The deliveries the Hub made for one comment (its creation and each edit), to the bot's webhook."""
    (hook,) = [w for w in world.hub.hub.list_webhooks() if w.url == webhook_url]
    return [
        d.payload
        for d in world.hub.deliveries(hook.id)
        if d.payload["event"]["scope"] == "discussion.comment"
        and d.payload.get("comment", {}).get("id") == comment_id
    ]


def test_each_job_writes_its_status_comment_at_most_ten_times(
    world: World, serve_bot: BotFactory, big_models: tuple[str, str]
) -> None:
    server = serve_bot(run_jobs=False, max_jobs_per_user=10, progress_interval_s=0)
    base, ft = big_models
    big = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    names = [f"budget-{i}" for i in range(4)]
    for name, recipe in zip(names, [RECIPE, RECIPE, RECIPE, big], strict=True):
        world.alice.create_discussion(f"{BOT}/requests", name, description=merge_command(name, recipe))
    wait_for(lambda: len(server.bot.store.all()) == 4, what="four queued jobs")
    wait_for(lambda: all(j.status_comment for j in server.bot.store.all()), what="their status comments")
    server.bot.queue.resume()
    jobs = [finished_job(server.bot, f"{BOT}/{name}", timeout=120) for name in names]
    assert [j.state for j in jobs] == ["succeeded"] * 4, [j.reason for j in jobs]
    for job in jobs:
        assert job.status_comment is not None
        writes = _status_writes(world, server.url, job.status_comment)
        assert 3 <= len(writes) <= COMMENTS_PER_JOB, job.spec.destination
        assert writes[0]["event"]["action"] == "create"
        assert all(w["event"]["action"] == "update" for w in writes[1:])
        assert writes[-1]["comment"]["content"].startswith(f"✅ Job `{job.id}` is done")
    last = [w["comment"]["content"] for w in _status_writes(world, server.url, jobs[-1].status_comment or "")]
    assert "position 4" in last[0] and any("position 1" in t for t in last)
    assert any("% merged" in t for t in last) and any("publishing" in t for t in last)
    # the bot's own edits came back as deliveries and were dropped unrecorded: no work, no store row
    key = f"delivery:discussion.comment:update:{BOT}/requests:comment={jobs[-1].status_comment}"
    assert server.bot.store.remember(key)


@pytest.fixture
def patient_bot(world: World, tmp_path: Path) -> Iterator[tuple[Bot, list[float]]]:
    """A bot whose retries wait on a list, not on the clock (no webhook: commands are handed in)."""
    slept: list[float] = []
    hub = Hub(
        world.hub.endpoint,
        BOT_TOKEN,
        retry=RetryPolicy(tries=3, sleep=slept.append, jitter=lambda: 0.0),
    )
    bot = Bot(make_settings(world, tmp_path / "patient"), hub=hub)
    bot.start()
    yield bot, slept
    bot.stop()
    world.hub.hub.limits.throttle_next("commit", 0)


def _request(world: World, bot: Bot, name: str) -> None:
    num = world.alice.create_discussion(f"{BOT}/requests", name, description=merge_command(name, RECIPE)).num
    bot.on_discussion(f"{BOT}/requests", num, None)


def test_a_final_commit_refused_twice_with_429_is_published(
    world: World, patient_bot: tuple[Bot, list[float]]
) -> None:
    bot, slept = patient_bot
    world.hub.hub.limits.throttle_next("commit", times=2, retry_after=3)
    _request(world, bot, "rate-limited")
    job = finished_job(bot, f"{BOT}/rate-limited")
    assert job.state == "succeeded", job.reason
    assert slept == [3.0, 3.0]  # the Retry-After the hub sent, twice
    assert world.alice.list_repo_commits(f"{BOT}/rate-limited")[0].commit_id == job.result_commit


def test_a_final_commit_that_keeps_failing_fails_the_job_cleanly(
    world: World, patient_bot: tuple[Bot, list[float]]
) -> None:
    bot, slept = patient_bot
    world.hub.hub.limits.throttle_next("commit", times=100, retry_after=3)
    _request(world, bot, "never-published")
    job = finished_job(bot, f"{BOT}/never-published")
    assert job.state == "failed"
    assert job.reason == (
        f"The Hub failed while committing to `{BOT}/never-published` (HTTP 429, 3 tries); "
        "the bot will not retry this step."
    )
    assert slept == [3.0, 3.0]
    assert not world.alice.repo_exists(f"{BOT}/never-published")  # no half-made repo is left
    num = job.spec.report.num if job.spec.report else 0
    last = world.alice.get_discussion_details(f"{BOT}/requests", num).events[-1]
    assert "failed" in getattr(last, "content", "") and "HTTP 429" in getattr(last, "content", "")


def test_the_poll_answers_a_remerge_missed_in_a_discussion_of_the_bots_own_repo(
    world: World, serve_bot: BotFactory
) -> None:
    # the requests repo holds other tests' discussions: this bot reads its own repos only
    server = serve_bot(webhook=False, run_jobs=False, requests_repo=f"{BOT}/no-requests")
    bot = server.bot
    destination = f"{BOT}/poll-made"
    world.bot_api.create_repo(destination)
    parents = {repo: world.alice.model_info(repo).sha or "" for repo in ("acme/base", "alice/ft-mit")}
    previous = bot.store.add(
        JobSpec(
            requester="alice",
            destination=destination,
            recipe_yaml="merge_method: linear\nmodels:\n  - model: acme/base\n    parameters: {weight: 0.5}\n  - model: alice/ft-mit\n    parameters: {weight: 0.5}\n",
            parents=parents,
        )
    )
    bot.store.finish(previous.id, "succeeded", commit="0" * 40)
    # the webhook missed it (the bot was down, or the daily limit was reached): no redelivery comes
    num = world.bob.create_discussion(destination, "parents moved?", description=f"@{BOT} remerge").num
    assert [j.spec.kind for j in bot.store.all_for(destination)] == ["merge"]
    bot.poll()
    jobs = bot.store.all_for(destination)
    assert [(j.spec.kind, j.state, j.spec.requester) for j in jobs] == [
        ("merge", "succeeded", "alice"),
        ("remerge", "queued", "bob"),
    ]
    assert jobs[-1].spec.report is not None and jobs[-1].spec.report.repo_id == destination
    bot.poll()  # seen again: not answered twice
    assert len(bot.store.all_for(destination)) == 2
    replies = [e for e in world.bob.get_discussion_details(destination, num).events if e.author == BOT]
    assert len(replies) == 1


def test_the_polls_reads_are_bounded_and_every_repo_is_read_in_turn(
    world: World, serve_bot: BotFactory
) -> None:
    server = serve_bot(webhook=False, run_jobs=False, poll_max_calls=3, requests_repo=f"{BOT}/no-requests")
    bot = server.bot
    turns = [f"{BOT}/turn-{i}" for i in range(3)]
    for destination in turns:
        world.bot_api.create_repo(destination)
        made = bot.store.add(JobSpec(requester="alice", destination=destination, recipe_yaml="", parents={}))
        bot.store.finish(made.id, "succeeded", commit="0" * 40)
        world.alice.create_discussion(destination, "status?", description=f"@{BOT} status")

    def answered() -> set[str]:
        return {
            repo
            for repo in turns
            if any(e.author == BOT for e in world.alice.get_discussion_details(repo, 1).events)
        }

    # reads: the requests repo (none), turn-2 (newest), its discussion: the budget is spent
    assert bot.catch_up() == 3 and answered() == {turns[2]}
    assert bot.catch_up() == 3 and answered() == {turns[2], turns[1]}  # turn-1 read, turn-0 listed
    assert bot.catch_up() <= 3 and answered() == set(turns)
