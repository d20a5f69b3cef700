"""Replies in discussions: bad recipes, licence refusals, help, status, cancel, and what the bot ignores."""

from __future__ import annotations

from pathlib import Path

from botkit import (
    ALICE_TOKEN,
    BOT,
    RECIPE,
    BotFactory,
    World,
    card,
    finished_job,
    merge_command,
    upload_model,
    wait_for,
)
from huggingface_hub.community import DiscussionComment


def replies(world: World, num: int, repo: str = f"{BOT}/requests") -> list[str]:
    details = world.alice.get_discussion_details(repo, num)
    return [e.content for e in details.events if isinstance(e, DiscussionComment) and e.author == BOT]


def wait_reply(world: World, num: int, count: int = 1, repo: str = f"{BOT}/requests") -> list[str]:
    found: list[str] = wait_for(
        lambda: (r := replies(world, num, repo)) and len(r) >= count and r, what="a reply"
    )
    return found


def ask(world: World, text: str, who: str = "alice") -> int:
    api = world.alice if who == "alice" else world.bob
    return api.create_discussion(f"{BOT}/requests", "A request", description=text).num


def test_a_bad_recipe_gets_a_clear_reply_and_nothing_is_queued(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    num = ask(
        world,
        merge_command(
            "bad-recipe", "merge_method: tiess\nbase_model: acme/base\nmodels:\n  - model: alice/ft-mit\n"
        ),
    )
    (reply,) = wait_reply(world, num)
    assert "could not use that recipe" in reply and "merge_method" in reply and "ties" in reply
    assert server.bot.store.all() == []


def test_missing_parent_is_named(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    recipe = "merge_method: linear\nmodels:\n  - model: acme/base\n    parameters: {weight: 1}\n  - model: nobody/nothing\n    parameters: {weight: 1}\n"
    (reply,) = wait_reply(world, ask(world, merge_command("missing", recipe)))
    assert "`nobody/nothing` does not exist" in reply
    assert server.bot.store.all() == []


def test_local_paths_are_refused(world: World, serve_bot: BotFactory) -> None:
    serve_bot()
    recipe = f"merge_method: linear\nmodels:\n  - model: {world.family.base}\n    parameters: {{weight: 1}}\n"
    (reply,) = wait_reply(world, ask(world, merge_command("local-path", recipe)))
    assert "is not a Hub repo id" in reply


def test_no_derivatives_parent_is_refused(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    recipe = RECIPE.replace("bob/ft-apache", "bob/ft-nd")
    (reply,) = wait_reply(world, ask(world, merge_command("nd-merge", recipe)))
    assert "license reasons" in reply and "`bob/ft-nd` is licensed cc-by-nd-4.0" in reply
    assert server.bot.store.all() == []
    assert not world.alice.repo_exists(f"{BOT}/nd-merge")


def test_two_vendor_licences_conflict(world: World, serve_bot: BotFactory) -> None:
    serve_bot()
    recipe = RECIPE.replace("alice/ft-mit", "alice/ft-llama").replace("bob/ft-apache", "bob/ft-gemma")
    (reply,) = wait_reply(world, ask(world, merge_command("Llama-mix", recipe)))
    assert "different vendor licences (gemma, llama3)" in reply


def test_llama3_naming_rule_then_success(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    recipe = RECIPE.replace("alice/ft-mit", "alice/ft-llama")
    (reply,) = wait_reply(world, ask(world, merge_command("my-merge", recipe)))
    assert 'start with "Llama"' in reply and "--name Llama-my-merge" in reply
    ask(world, merge_command("Llama-my-merge", recipe))
    job = finished_job(server.bot, f"{BOT}/Llama-my-merge")
    assert job.state == "succeeded", job.reason
    readme = world.alice.hf_hub_download(f"{BOT}/Llama-my-merge", "README.md")
    text = Path(readme).read_text(encoding="utf-8")
    assert "license: llama3" in text and "Built with Llama" in text


def test_other_licence_needs_accept_license(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    recipe = RECIPE.replace("bob/ft-apache", "bob/ft-other")
    (reply,) = wait_reply(world, ask(world, merge_command("other-merge", recipe)))
    assert "--accept-license" in reply and "custom-terms" in reply
    assert server.bot.store.all() == []
    ask(world, merge_command("other-merge", recipe, " --accept-license"))
    job = finished_job(server.bot, f"{BOT}/other-merge")
    assert job.state == "succeeded", job.reason
    info = world.alice.model_info(f"{BOT}/other-merge")
    assert info.card_data is not None and info.card_data.license == "other"
    assert info.card_data.to_dict()["license_name"] == "custom-terms"
    # the parent's link is relative to its own repo: the merge's card points there, not to itself
    link = info.card_data.to_dict()["license_link"]
    assert link.startswith(f"{world.hub.endpoint}/bob/ft-other/blob/") and link.endswith("/LICENSE")


def test_help_invalid_status_and_ignored_text(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    num = ask(world, f"@{BOT} help")
    (help_text,) = wait_reply(world, num)
    assert f"@{BOT} merge --name" in help_text and "```yaml" in help_text
    world.alice.comment_discussion(f"{BOT}/requests", num, "Thanks, this is just a note to myself.")
    world.alice.comment_discussion(f"{BOT}/requests", num, f"@{BOT} mergee --name x")
    texts = wait_reply(world, num, 2)
    assert "`mergee` is not a command I know" in texts[1] and f"@{BOT} merge --name" in texts[1]
    world.alice.comment_discussion(f"{BOT}/requests", num, f"@{BOT} status")
    texts = wait_reply(world, num, 3)
    assert "@alice has no jobs" in texts[2]
    assert len(replies(world, num)) == 3  # the note got no answer; the bot's own comments got none
    assert server.bot.store.all() == []


def test_cancel_a_queued_job_and_status_shows_the_queue(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False)  # merges wait: the queue fills
    first = ask(world, merge_command("queued-one", RECIPE))
    second = ask(world, merge_command("queued-two", RECIPE))
    wait_for(lambda: len(server.bot.store.all()) == 2, what="two jobs")
    one, two = server.bot.store.all()
    assert "position 1" in wait_reply(world, first)[0] and "position 2" in wait_reply(world, second)[0]
    world.alice.comment_discussion(f"{BOT}/requests", first, f"@{BOT} status")
    status = wait_reply(world, first, 2)[1]
    assert f"`{one.id}`" in status and "queued (position 1)" in status and "queued (position 2)" in status
    world.bob.comment_discussion(f"{BOT}/requests", first, f"@{BOT} cancel {one.id}")  # not bob's job
    assert "No job" in wait_reply(world, first, 3)[2]
    world.alice.comment_discussion(f"{BOT}/requests", first, f"@{BOT} cancel")
    assert f"Cancelled job `{one.id}`" in wait_reply(world, first, 4)[3]
    assert server.bot.store.get(one.id).state == "cancelled"  # type: ignore[union-attr]
    assert "cancelled before it started" in replies(world, first)[0]  # the status comment, edited
    assert server.bot.store.queue_position(two.id) == 1


def test_per_user_limit(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False, max_jobs_per_user=1)
    ask(world, merge_command("limit-one", RECIPE), who="bob")
    wait_for(lambda: len(server.bot.store.all()) == 1, what="a job")
    num = ask(world, merge_command("limit-two", RECIPE), who="bob")
    (reply,) = wait_reply(world, num)
    assert "@bob already has 1 merge(s) waiting" in reply
    assert len(server.bot.store.all()) == 1


def test_a_merge_above_the_size_limit_is_refused(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False, max_merge_bytes=1000)  # the tiny test models are ~90 kB
    (reply,) = wait_reply(world, ask(world, merge_command("too-big", RECIPE)))
    assert "above this bot's limit of 0.0 GB" in reply and "mergebot merge" in reply
    assert server.bot.store.all() == []


def test_existing_destination_is_refused(world: World, serve_bot: BotFactory) -> None:
    serve_bot()
    (reply,) = wait_reply(world, ask(world, merge_command("requests", RECIPE)))
    assert f"`{BOT}/requests` already exists" in reply


def test_a_gated_parent_makes_the_result_gated(world: World, serve_bot: BotFactory) -> None:
    # A discussion cannot use a gated parent (see test_bot_rights); a signed-in Space user can,
    # and the result keeps the gate.
    from pydantic import SecretStr

    from bot.credentials import UserCredential
    from space.service import SpaceService

    parent = "alice/gated-parent"  # localhub lets the owner's namespace read its gated repos
    upload_model(world.alice, parent, world.family.finetunes[0], card("mit", "acme/base"))
    world.alice.update_repo_settings(parent, gated="auto")
    server = serve_bot()
    alice = UserCredential("alice", SecretStr(ALICE_TOKEN))
    SpaceService(server.bot).submit(
        RECIPE.replace("alice/ft-mit", parent), name="from-gated", private=True, signed_in=alice
    )
    job = finished_job(server.bot, "alice/from-gated")
    assert job.state == "succeeded", job.reason
    info = world.alice.model_info("alice/from-gated")
    assert info.gated == "auto" and info.private
    assert not world.bob.repo_exists("alice/from-gated")
    text = Path(world.alice.hf_hub_download("alice/from-gated", "README.md")).read_text(encoding="utf-8")
    assert "A parent is gated, so the merge is gated too." in text


def test_queued_comments_show_the_place_as_the_queue_moves(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False)
    first = ask(world, merge_command("moving-one", RECIPE))
    second = ask(world, merge_command("moving-two", RECIPE))
    wait_for(lambda: len(server.bot.store.all()) == 2 and server.bot.store.pending() == [], what="two jobs")
    assert "position 2" in wait_reply(world, second)[0]
    server.bot.queue.resume()
    assert finished_job(server.bot, f"{BOT}/moving-two").state == "succeeded"
    details = world.alice.get_discussion_details(f"{BOT}/requests", second)
    (status,) = [e for e in details.events if isinstance(e, DiscussionComment) and e.author == BOT]
    history = [h["raw"] for h in status.edit_history][::-1]
    assert "position 2" in history[0] and any("position 1" in h for h in history[1:])
    assert "is done" in wait_reply(world, first)[0]


def test_the_queued_comment_gives_the_recipes_notes(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False)
    typo = RECIPE + "parameters: {nomalize: true}\nname: my-first-step\n"
    num = ask(world, merge_command("noted", typo))
    (queued,) = wait_reply(world, num)
    assert "is queued" in queued and "Notes on the recipe:" in queued
    assert "parameter 'nomalize' has no effect (did you mean 'normalize'?)" in queued
    assert "field 'name' has no effect: mergekit-multi" in queued
    assert len(server.bot.store.all()) == 1
