"""Parents move on: a `repo` update webhook, a `remerge` command, or the poll re-run the merge as a new commit."""

from __future__ import annotations

import time
from pathlib import Path

from botkit import BOT, BotFactory, World, card, finished_job, merge_command, upload_model, wait_for
from huggingface_hub import ModelCard

from bot.jobs import Job


def recipe(a: str, b: str) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"


def card_of(world: World, repo: str, revision: str) -> ModelCard:
    path = world.alice.hf_hub_download(repo, "README.md", revision=revision)
    return ModelCard(Path(path).read_text(encoding="utf-8"))


def succeeded(bot_jobs: list[Job], count: int) -> bool:
    return len([j for j in bot_jobs if j.state == "succeeded"]) >= count


def test_a_parent_update_triggers_a_remerge(world: World, serve_bot: BotFactory) -> None:
    family = world.family
    upload_model(world.bob, "bob/moving", family.finetunes[0], card("mit", "acme/base"))
    server = serve_bot(watch=(f"user:{BOT}", "model:bob/moving"))
    dest = f"{BOT}/follows-moving"
    world.alice.create_discussion(
        f"{BOT}/requests",
        "merge please",
        description=merge_command("follows-moving", recipe("acme/base", "bob/moving")),
    )
    first = finished_job(server.bot, dest)
    assert first.state == "succeeded", first.reason
    old_sha = first.spec.parents["bob/moving"]

    new = world.bob.upload_folder(
        repo_id="bob/moving", folder_path=str(family.finetunes[1]), ignore_patterns=["README.md"]
    )
    wait_for(lambda: succeeded(server.bot.store.all_for(dest), 2), 60, "the re-merge")
    second = server.bot.store.all_for(dest)[-1]
    assert second.spec.kind == "remerge" and second.spec.parents["bob/moving"] == new.oid != old_sha
    assert second.spec.parents["acme/base"] == first.spec.parents["acme/base"]
    commits = world.alice.list_repo_commits(dest)
    assert [c.title.split(" (")[0] for c in commits] == [
        "Re-merge follows-moving",
        "Merge follows-moving",
        "initial commit",
    ]
    assert (
        new.oid[:12] in card_of(world, dest, commits[0].commit_id).content
    )  # the card records each parent's revision
    assert old_sha[:12] in card_of(world, dest, commits[1].commit_id).content
    # the same update delivered again (or seen by the poll) does not re-merge twice
    server.bot.on_repo_update("bob/moving", new.oid)
    server.bot.poll()
    assert len(server.bot.store.all_for(dest)) == 2


def test_remerge_command_and_poll(world: World, serve_bot: BotFactory) -> None:
    family = world.family
    upload_model(world.bob, "bob/moving2", family.finetunes[0], card("mit", "acme/base"))
    server = serve_bot(watch=(f"user:{BOT}",))  # the parent is not watched: only the poll sees it move
    dest = f"{BOT}/follows-moving2"
    world.alice.create_discussion(
        f"{BOT}/requests",
        "merge please",
        description=merge_command("follows-moving2", recipe("acme/base", "bob/moving2")),
    )
    assert finished_job(server.bot, dest).state == "succeeded"

    # `remerge` in a discussion on the result repo, when nothing moved: a new commit with the same parents
    discussion = world.bob.create_discussion(dest, "again please", description=f"@{BOT} remerge")
    wait_for(lambda: succeeded(server.bot.store.all_for(dest), 2), 60, "the re-merge")
    wait_for(
        lambda: any(
            "is done" in getattr(e, "content", "")
            for e in world.alice.get_discussion_details(dest, discussion.num).events
        ),
        what="the done comment in the result repo's discussion",
    )
    # `remerge` on a repo the bot did not make
    other = world.bob.create_discussion(f"{BOT}/requests", "remerge this", description=f"@{BOT} remerge")
    wait_for(
        lambda: any(
            "is not a merge I made" in getattr(e, "content", "")
            for e in world.alice.get_discussion_details(f"{BOT}/requests", other.num).events
        ),
        what="the refusal",
    )

    new = world.bob.upload_folder(
        repo_id="bob/moving2", folder_path=str(family.finetunes[2]), ignore_patterns=["README.md"]
    )
    server.bot.poll()
    wait_for(lambda: succeeded(server.bot.store.all_for(dest), 3), 60, "the polled re-merge")
    assert server.bot.store.all_for(dest)[-1].spec.parents["bob/moving2"] == new.oid

    # a re-merge is held to the size limit like a new merge (the limit may have been lowered since)
    server.bot.settings = server.bot.settings.model_copy(update={"max_merge_bytes": 1000})
    again = world.bob.create_discussion(dest, "once more", description=f"@{BOT} remerge")
    wait_for(
        lambda: any(
            "above this bot's limit" in getattr(e, "content", "")
            for e in world.alice.get_discussion_details(dest, again.num).events
        ),
        what="the size refusal",
    )
    assert len(server.bot.store.all_for(dest)) == 3


def test_the_interval_poll_answers_a_missed_request(world: World, serve_bot: BotFactory) -> None:
    world.bot_api.create_repo(f"{BOT}/requests-missed")
    num = world.alice.create_discussion(f"{BOT}/requests-missed", "help", description=f"@{BOT} help").num
    server = serve_bot(
        webhook=False, run_jobs=False, requests_repo=f"{BOT}/requests-missed", poll_interval_s=0.3
    )

    def answers() -> list[object]:
        events = world.alice.get_discussion_details(f"{BOT}/requests-missed", num).events
        return [e for e in events if getattr(e, "author", None) == BOT]

    wait_for(answers, 20, "the poll to answer")
    time.sleep(1.0)  # several more polls
    assert len(answers()) == 1
    server.bot.poll()
    assert len(answers()) == 1
