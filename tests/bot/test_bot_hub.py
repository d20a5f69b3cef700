"""bot.hub against localhub: lineage limits, gating, and a failed publication leaves nothing."""

from __future__ import annotations

import pytest
from botkit import BOT, BOT_TOKEN, World

from bot.errors import PreflightError
from bot.hub import Hub


def test_lineage_is_depth_limited(world: World) -> None:
    hub = Hub(world.hub.endpoint, BOT_TOKEN)
    shallow = hub.lineage(["alice/ft-mit"], depth=1)
    assert [n.repo_id for n in shallow.nodes] == ["alice/ft-mit", "acme/base"] and shallow.truncated
    deep = hub.lineage(["alice/ft-mit", "bob/ft-apache"], depth=5)
    assert {n.repo_id for n in deep.nodes} == {
        "alice/ft-mit",
        "bob/ft-apache",
        "acme/base",
        "acme/grandbase",
        "bob/missing-parent",
    }
    assert not deep.truncated and [n.repo_id for n in deep.nodes if n.missing] == ["bob/missing-parent"]


def test_repo_facts(world: World) -> None:
    hub = Hub(world.hub.endpoint, BOT_TOKEN)
    facts = hub.repo_facts("bob/ft-other")
    assert (
        facts.license == "other"
        and facts.license_name == "custom-terms"
        and facts.base_models == ("acme/base",)
    )
    assert len(facts.sha) == 40
    with pytest.raises(PreflightError, match="has no revision"):
        hub.repo_facts("bob/ft-other", "nope")


def test_publication_is_atomic_and_gated(world: World) -> None:
    hub = Hub(world.hub.endpoint, BOT_TOKEN)
    with hub.publication(f"{BOT}/gated-result", private=False, gated=True) as pub:
        pub.add("a.txt", b"hello")
        assert not world.alice.repo_exists(f"{BOT}/gated-result")  # private until committed: not even empty
        assert world.bot_api.list_repo_files(f"{BOT}/gated-result") == [".gitattributes"]
        pub.commit("Merge (mergebot-job: j1)", "")
        assert not world.alice.repo_exists(f"{BOT}/gated-result")  # public once the block is done
    assert world.alice.repo_exists(f"{BOT}/gated-result")
    assert world.bot_api.model_info(f"{BOT}/gated-result").private is False
    assert world.bot_api.model_info(f"{BOT}/gated-result").gated == "auto"
    with hub.publication(f"{BOT}/private-result", private=True, gated=False) as pub:
        pub.add("a.txt", b"hello")
        pub.commit("Merge (mergebot-job: j3)", "")
    assert not world.alice.repo_exists(f"{BOT}/private-result")
    assert hub.commit_with_marker(f"{BOT}/gated-result", "mergebot-job: j1") is not None
    assert hub.commit_with_marker(f"{BOT}/gated-result", "mergebot-job: j2") is None

    with pytest.raises(RuntimeError), hub.publication(f"{BOT}/never", private=True, gated=False) as pub:
        pub.add("a.txt", b"x")
        raise RuntimeError("the merge failed")
    assert not hub.repo_exists(f"{BOT}/never")
