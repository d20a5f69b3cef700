"""Rights: every input is read with the requester's rights, never the bot's, and a result is never
published more widely than its inputs (issue #13).

- A discussion proves no rights: it may use what an anonymous visitor can read (public, ungated),
  and cannot ask for a private result in the bot's namespace.
- A signed-in Space user's inputs are read with their own token; a private input needs a private
  result (in their namespace).
- A re-merge checks the same rights again: a parent gone private is refused with a note.
- Guests of the Space are each their own requester; no Hub account can pass for one.
"""

from __future__ import annotations

import pytest
from botkit import (
    ALICE_TOKEN,
    BOB_TOKEN,
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
from huggingface_hub import HfApi
from huggingface_hub.community import DiscussionComment
from pydantic import SecretStr

from bot.credentials import UserCredential
from bot.errors import AccessRefused, BotError, PreflightError, QuotaError
from bot.jobs import is_guest, new_guest
from space.service import SpaceService

ALICE = UserCredential("alice", SecretStr(ALICE_TOKEN))
BOB = UserCredential("bob", SecretStr(BOB_TOKEN))
SQUATTER = "space-guest"  # a Hub account holding the name the Space's guests used to share
SQUATTER_TOKEN = "hf_squatterSECRETtoken_0123456789"


def linear(*models: str) -> str:
    rows = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return f"merge_method: linear\nmodels:\n{rows}dtype: float32\n"


def ask(api: HfApi, text: str) -> int:
    return api.create_discussion(f"{BOT}/requests", "A request", description=text).num


def wait_reply(world: World, num: int, count: int = 1) -> list[str]:
    def bot_replies() -> list[str]:
        events = world.alice.get_discussion_details(f"{BOT}/requests", num).events
        return [e.content for e in events if isinstance(e, DiscussionComment) and e.author == BOT]

    found: list[str] = wait_for(lambda: (r := bot_replies()) and len(r) >= count and r, what="a reply")
    return found


@pytest.fixture(scope="module")
def hidden(world: World) -> dict[str, str]:
    """A private model of the bot's own namespace, a gated one, and a private one of alice's."""
    ft = world.family.finetunes
    made = {
        "bot-private": f"{BOT}/private-ft",
        "gated": f"{BOT}/gated-ft",
        "alice-private": "alice/private-ft",
    }
    upload_model(world.bot_api, made["bot-private"], ft[0], card("mit", "acme/base"), private=True)
    upload_model(world.bot_api, made["gated"], ft[1], card("mit", "acme/base"))
    world.bot_api.update_repo_settings(made["gated"], gated="auto")
    upload_model(world.alice, made["alice-private"], ft[2], card("mit", "acme/secret-base"), private=True)
    world.hub.add_user(SQUATTER, SQUATTER_TOKEN)
    return made


def test_a_discussion_cannot_launder_what_an_anonymous_visitor_cannot_read(
    world: World, serve_bot: BotFactory, hidden: dict[str, str]
) -> None:
    server = serve_bot()
    # mallory (bob) names the bot's private model at weight 1: the bot could read it, bob could not
    (reply,) = wait_reply(world, ask(world.bob, merge_command("laundered", linear(hidden["bot-private"]))))
    assert f"`{hidden['bot-private']}` is not public" in reply and "Nothing was queued" in reply
    (reply,) = wait_reply(world, ask(world.bob, merge_command("ungated", linear(hidden["gated"]))))
    assert f"`{hidden['gated']}` is gated" in reply
    (reply,) = wait_reply(world, ask(world.bob, merge_command("peek", linear(hidden["alice-private"]))))
    assert f"`{hidden['alice-private']}` does not exist" in reply
    # a private result cannot be asked for in the bot's namespace, even with public parents
    (reply,) = wait_reply(world, ask(world.alice, merge_command("alice-secret", RECIPE, " --private")))
    assert "A private result must go to your own namespace" in reply
    assert server.bot.store.all() == []
    for name in ("laundered", "ungated", "peek", "alice-secret"):
        assert not world.bot_api.repo_exists(f"{BOT}/{name}")


def test_a_signed_in_user_reads_with_their_own_token(
    world: World, serve_bot: BotFactory, hidden: dict[str, str]
) -> None:
    server = serve_bot(run_jobs=False, webhook=False)
    service = SpaceService(server.bot)
    mine = RECIPE.replace("alice/ft-mit", hidden["alice-private"])
    with pytest.raises(AccessRefused, match="is private, so the result must be private too"):
        service.submit(mine, name="from-private", signed_in=ALICE)
    report = service.check(mine, name="from-private", signed_in=ALICE)
    assert any("must be private too" in p for p in report.problems)
    assert service.check(mine, name="from-private", signed_in=ALICE, private=True).ok
    job = service.submit(mine, name="from-private", private=True, signed_in=ALICE)
    assert job.spec.destination == "alice/from-private" and job.spec.private
    # the Space's queue names a private job only to its requester
    (seen,) = [j for j, _ in service.jobs() if j.id == job.id]
    assert seen.spec.destination == "(private)" and seen.spec.requester == "(private)"
    (seen,) = [j for j, _ in service.jobs(viewer="bob") if j.id == job.id]
    assert "alice" not in seen.spec.model_dump_json()
    (seen,) = [j for j, _ in service.jobs(viewer="alice") if j.id == job.id]
    assert seen.spec.destination == "alice/from-private"
    # bob's own token cannot see alice's private model, nor does the bot's lend it to him
    with pytest.raises(PreflightError, match="does not exist"):
        service.submit(mine, name="from-alices", private=True, signed_in=BOB)
    assert not service.check(mine, name="from-alices", signed_in=BOB, private=True).ok
    # without sign-in, the Space is a discussion: public parents, public results
    with pytest.raises(AccessRefused, match="private result must go to your own namespace"):
        service.submit(RECIPE, name="guest-private", private=True)
    report = service.check(linear(hidden["bot-private"]), name="guest-peek")
    assert any("is not public" in p for p in report.problems)


def test_the_card_does_not_follow_private_ancestors(
    world: World, serve_bot: BotFactory, hidden: dict[str, str]
) -> None:
    server = serve_bot(run_jobs=False, webhook=False)
    # the bot's token reads its own private model, but the card tells nothing the token saw there
    lineage = server.bot.hub.lineage([hidden["bot-private"], "alice/ft-mit"], 4)
    nodes = {n.repo_id: n for n in lineage.nodes}
    assert nodes[hidden["bot-private"]].missing and nodes[hidden["bot-private"]].license is None
    assert nodes[hidden["bot-private"]].parents == () and nodes["alice/ft-mit"].parents == ("acme/base",)


def test_a_parent_gone_private_or_gated_is_not_remerged(world: World, serve_bot: BotFactory) -> None:
    ft = world.family.finetunes
    upload_model(world.bob, "bob/turns-private", ft[0], card("mit", "acme/base"))
    upload_model(world.bot_api, f"{BOT}/turns-gated", ft[1], card("mit", "acme/base"))
    server = serve_bot()
    asked = {
        parent: ask(world.alice, merge_command(name, linear("acme/base", parent)))
        for name, parent in (("follows-private", "bob/turns-private"), ("follows-gated", f"{BOT}/turns-gated"))
    }
    for name in ("follows-private", "follows-gated"):
        first = finished_job(server.bot, f"{BOT}/{name}")
        assert first.state == "succeeded", first.reason
    world.bob.update_repo_settings("bob/turns-private", private=True)
    world.bot_api.update_repo_settings(f"{BOT}/turns-gated", gated="auto")
    for parent, api, why in (
        ("bob/turns-private", world.bob, "cannot see it"),  # private to someone else: the bot sees nothing
        (f"{BOT}/turns-gated", world.bot_api, "is gated"),  # gated: the bot could read it, the public cannot
    ):
        moved = api.upload_folder(repo_id=parent, folder_path=str(ft[2]), ignore_patterns=["README.md"])
        assert server.bot.on_repo_update(parent, moved.oid) == []
        replies = wait_reply(world, asked[parent], 2)  # the job's status comment, and the note
        assert f"`{parent}` changed" in replies[-1] and why in replies[-1]
        server.bot.on_repo_update(parent, moved.oid)  # seen again: no second note, no job
        assert len(wait_reply(world, asked[parent], 2)) == 2
    for name in ("follows-private", "follows-gated"):
        assert [j.spec.kind for j in server.bot.store.all_for(f"{BOT}/{name}")] == ["merge"]
        commits = world.alice.list_repo_commits(f"{BOT}/{name}")
        assert not any("Re-merge" in c.title for c in commits)


def test_guests_are_each_their_own_requester(world: World, serve_bot: BotFactory, hidden: dict[str, str]) -> None:
    server = serve_bot(run_jobs=False, max_jobs_per_user=1, max_guest_jobs=2)
    service = SpaceService(server.bot)
    one, two, three = new_guest(), new_guest(), new_guest()
    assert one != two and is_guest(one) and ":" in one
    first = service.submit(RECIPE, name="guest-one", requester=one)
    assert first.spec.requester == one
    assert all(j.spec.requester != one for j, _ in service.jobs())  # the queue shows "guest", not the id
    with pytest.raises(QuotaError):  # the same page session: its own quota
        service.submit(RECIPE, name="guest-one-more", requester=one)
    second = service.submit(RECIPE, name="guest-two", requester=two)  # another session is not blocked
    with pytest.raises(QuotaError, match="not signed in already have 2"):  # all guests together
        service.submit(RECIPE, name="guest-three", requester=three)
    with pytest.raises(BotError):
        service.cancel(first.id, user=SQUATTER)
    with pytest.raises(BotError):
        service.cancel(first.id, user=one)  # a name is not a session
    # a Hub account named like the old shared guest sees and cancels nothing of theirs
    squatter = HfApi(endpoint=world.hub.endpoint, token=SQUATTER_TOKEN)
    (status,) = wait_reply(world, ask(squatter, f"@{BOT} status"))
    assert first.id not in status and second.id not in status
    (cancel,) = wait_reply(world, ask(squatter, f"@{BOT} cancel {first.id}"))
    assert f"No job `{first.id}` of yours" in cancel
    assert server.bot.store.get(first.id).state == "queued"  # type: ignore[union-attr]
    assert "Cancelled" in service.cancel(first.id, user=None, session_jobs=[first.id])
    # a requester that is not a guest identity is not taken at its word
    assert service.submit(RECIPE, name="not-alice", requester="alice").spec.requester != "alice"


def test_stacked_slices_are_bounded(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(max_slices=4)
    rows = "".join(
        "  - sources:\n      - model: acme/base\n        layer_range: [0, 2]\n" for _ in range(5)
    )
    stacked = f"merge_method: passthrough\nslices:\n{rows}dtype: float32\n"
    (reply,) = wait_reply(world, ask(world.bob, merge_command("stacked", stacked)))
    assert "stacks 5 slices" in reply and "at most 4" in reply
    assert server.bot.store.all() == []


def test_a_job_past_the_time_limit_fails_and_publishes_nothing(world: World, serve_bot: BotFactory) -> None:
    now = [0.0]

    def clock() -> float:  # every look at the clock is an hour later
        now[0] += 3600
        return now[0]

    slow = serve_bot(job_timeout_minutes=30)
    slow.bot.worker.clock = clock
    ask(world.alice, merge_command("too-slow", RECIPE))
    job = finished_job(slow.bot, f"{BOT}/too-slow")
    assert job.state == "failed" and "limit of 30 minutes" in (job.reason or "")
    assert not world.bot_api.repo_exists(f"{BOT}/too-slow")


def test_private_results_go_to_the_requesters_namespace(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    job = SpaceService(server.bot).submit(RECIPE, name="alices-private", private=True, signed_in=ALICE)
    done = finished_job(server.bot, "alice/alices-private")
    assert done.id == job.id and done.state == "succeeded", done.reason
    assert world.alice.model_info("alice/alices-private").private
    assert not world.bob.repo_exists("alice/alices-private")


def test_rights_are_checked_again_when_a_job_runs(world: World, serve_bot: BotFactory) -> None:
    upload_model(world.bot_api, f"{BOT}/gated-later", world.family.finetunes[0], card("mit", "acme/base"))
    server = serve_bot(run_jobs=False)
    ask(world.bob, merge_command("before-the-gate", linear("acme/base", f"{BOT}/gated-later")))
    queued = wait_for(lambda: server.bot.store.all_for(f"{BOT}/before-the-gate"), what="the queued job")
    world.bot_api.update_repo_settings(f"{BOT}/gated-later", gated="auto")  # between queue and run
    server.bot.queue.resume()
    job = finished_job(server.bot, f"{BOT}/before-the-gate")
    assert job.id == queued[0].id and job.state == "failed" and "is gated" in (job.reason or "")
    assert not world.bot_api.repo_exists(f"{BOT}/before-the-gate")
