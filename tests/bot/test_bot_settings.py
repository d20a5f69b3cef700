"""Settings from the environment: the state folder's fallback and the publishing namespace."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from botkit import BOT, RECIPE, BotFactory, World, finished_job, merge_command

from bot.settings import Settings, SettingsError
from space.service import SpaceService

ENV = {"HF_TOKEN": "hf_x", "WEBHOOK_SECRET": "w"}


def test_a_writable_mergebot_data_is_used_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "state" / "mergebot"
    with caplog.at_level(logging.WARNING, logger="bot.settings"):
        settings = Settings.from_env({**ENV, "MERGEBOT_DATA": str(data), "HOME": str(tmp_path / "home")})
    assert settings.data_dir == data and data.is_dir()
    assert caplog.records == []


@pytest.mark.parametrize("data", [None, "a-file/mergebot"], ids=["unset", "not-writable"])
def test_state_falls_back_to_the_home_cache_with_a_warning(
    data: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("a file where a folder would go")
    env = {**ENV, "HOME": str(tmp_path / "home")}
    if data is not None:
        env["MERGEBOT_DATA"] = str(tmp_path / data)
    with caplog.at_level(logging.WARNING, logger="bot.settings"):
        settings = Settings.from_env(env)
    assert settings.data_dir == tmp_path / "home" / ".cache" / "mergebot"
    assert settings.data_dir.is_dir()
    (message,) = [r.getMessage() for r in caplog.records]
    assert ("is not set" if data is None else "is not writable") in message
    assert str(settings.data_dir) in message and "hf_x" not in message


def test_without_home_the_state_goes_to_the_temporary_folder(tmp_path: Path) -> None:
    home = tmp_path / "a-file"
    home.write_text("not a folder")
    settings = Settings.from_env({**ENV, "HOME": str(home), "MERGEBOT_DATA": str(home / "x")})
    assert settings.data_dir.name.startswith("mergebot-") and settings.data_dir.is_dir()
    assert not settings.data_dir.is_relative_to(tmp_path)


def test_namespace_is_read_and_checked(tmp_path: Path) -> None:
    env = {**ENV, "MERGEBOT_DATA": str(tmp_path)}
    assert Settings.from_env(env).namespace is None
    assert Settings.from_env({**env, "MERGEBOT_NAMESPACE": "merge-lab"}).namespace == "merge-lab"
    with pytest.raises(SettingsError, match="namespace"):
        Settings.from_env({**env, "MERGEBOT_NAMESPACE": "not/a namespace"})


def test_merges_are_published_in_the_configured_organisation(world: World, serve_bot: BotFactory) -> None:
    world.hub.hub.add_org("merge-lab", members=[BOT])
    server = serve_bot(namespace="merge-lab")
    assert server.bot.requests_repo == "merge-lab/requests"
    assert SpaceService(server.bot).destination("x") == "merge-lab/x"
    assert SpaceService(server.bot).destination("x", user="alice") == "alice/x"
    world.alice.create_discussion(
        f"{BOT}/requests", "In the lab", description=merge_command("lab-merge", RECIPE)
    )
    job = finished_job(server.bot, "merge-lab/lab-merge")
    assert job.state == "succeeded", job.reason
    assert world.alice.repo_exists("merge-lab/lab-merge")
    assert not world.alice.repo_exists(f"{BOT}/lab-merge")
