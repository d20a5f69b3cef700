"""Tokens never appear in comments, cards, logs or errors, whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest
from botkit import (
    ALICE_TOKEN,
    BOT,
    BOT_TOKEN,
    RECIPE,
    TOKENS,
    BotFactory,
    World,
    card,
    finished_job,
    make_settings,
    merge_command,
    upload_model,
    wait_for,
)
from huggingface_hub.community import DiscussionComment
from pydantic import SecretStr

from bot.cli import RedactSecrets
from bot.credentials import UserCredential
from bot.errors import BotError
from bot.hub import Hub
from bot.jobs import JobSpec
from bot.settings import Settings, SettingsError
from bot.worker import preflight


def test_no_token_anywhere(
    world: World, serve_bot: BotFactory, captured_logs: list[str], tmp_path: Path
) -> None:
    upload_model(world.alice, "alice/vanishing", world.family.finetunes[0], card("mit", "acme/base"))
    server = serve_bot(run_jobs=False)
    requests = f"{BOT}/requests"
    nums = [
        world.alice.create_discussion(
            requests, "ok merge", description=merge_command("secret-ok", RECIPE)
        ).num,
        world.alice.create_discussion(
            requests,
            "vanishing",
            description=merge_command("secret-fails", RECIPE.replace("bob/ft-apache", "alice/vanishing")),
        ).num,
        world.alice.create_discussion(
            requests, "bad yaml", description=merge_command("secret-bad", "merge_method: [\n")
        ).num,
        world.alice.create_discussion(
            requests,
            "no derivatives",
            description=merge_command("secret-nd", RECIPE.replace("bob/ft-apache", "bob/ft-nd")),
        ).num,
        world.alice.create_discussion(requests, "junk", description=f"@{BOT} please {TOKENS[0][:6]}").num,
    ]
    wait_for(lambda: len(server.bot.store.all()) == 2, what="two jobs")
    wait_for(lambda: server.bot.store.pending() == [], what="all deliveries handled")
    world.alice.delete_repo("alice/vanishing")
    server.bot.queue.resume()
    ok = finished_job(server.bot, f"{BOT}/secret-ok")
    failed = finished_job(server.bot, f"{BOT}/secret-fails")
    assert ok.state == "succeeded" and failed.state == "failed"
    assert failed.reason is not None and "alice/vanishing" in failed.reason
    assert not world.alice.repo_exists(f"{BOT}/secret-fails")  # a failure publishes nothing

    seen: list[str] = [j.reason or "" for j in server.bot.store.all()]
    seen += [j.spec.model_dump_json() for j in server.bot.store.all()]
    for num in nums:
        for event in world.alice.get_discussion_details(requests, num).events:
            if isinstance(event, DiscussionComment):
                seen.append(event.content)
                seen += [h.get("raw", "") for h in event.edit_history]
    assert any("failed: `alice/vanishing` does not exist" in s for s in seen)  # reported before `failed`
    readme = world.alice.hf_hub_download(f"{BOT}/secret-ok", "README.md", local_dir=tmp_path / "c")
    seen.append(Path(readme).read_text(encoding="utf-8"))
    seen.append(
        world.alice.hf_hub_download(f"{BOT}/secret-ok", "mergekit_config.yml", local_dir=tmp_path / "c")
    )
    seen += captured_logs
    seen += [repr(server.bot.settings), str(server.bot.settings), repr(server.bot.hub)]
    for item in (world.hub.data_dir if hasattr(world.hub, "data_dir") else tmp_path).glob("*.log"):
        seen.append(item.read_text())
    assert len(captured_logs) > 10
    joined = "\n".join(seen)
    for token in TOKENS:
        assert token not in joined


def test_a_signed_in_users_token_publishes_and_is_never_written(
    world: World, serve_bot: BotFactory, captured_logs: list[str], tmp_path: Path
) -> None:
    server = serve_bot(run_jobs=False, webhook=False)
    bot = server.bot
    pre = preflight(
        bot.hub, RECIPE, accept_license=False, name="x", endpoint=world.hub.endpoint, token=BOT_TOKEN
    )

    def user_job(user: str, name: str) -> JobSpec:
        return JobSpec(
            requester=user,
            destination=f"{user}/{name}",
            recipe_yaml=pre.config.to_yaml(),
            parents={r: f.sha for r, f in pre.facts.items()},
            credential="user",
        )

    revoked = "hf_bobREVOKEDtoken_0123456789"
    bot.enqueue(user_job("alice", "signed-in"), signed_in=UserCredential("alice", SecretStr(ALICE_TOKEN)))
    refused = bot.enqueue(user_job("bob", "revoked"), signed_in=UserCredential("bob", SecretStr(revoked)))
    forgotten = bot.enqueue(user_job("alice", "forgotten"))  # as after a restart: no credential held
    bot.queue.resume()
    ok = finished_job(bot, "alice/signed-in")
    assert ok.state == "succeeded", ok.reason

    def held(job_id: str) -> bool:
        return bot.store.get(job_id).state == "needs_sign_in"  # type: ignore[union-attr]

    wait_for(lambda: held(forgotten.id) and held(refused.id), what="both held for a new sign-in")
    failed = bot.store.get(refused.id)
    assert failed is not None and "expired or was revoked" in (failed.reason or "")
    assert not world.alice.repo_exists(f"{BOT}/forgotten") and not world.alice.repo_exists("alice/forgotten")
    commits = world.alice.list_repo_commits("alice/signed-in")
    merge = next(c for c in commits if "mergebot-job" in c.title)
    assert merge.authors == ["alice"] and BOT not in {a for c in commits for a in c.authors}
    assert not world.alice.repo_exists("bob/revoked") and bot.credentials.held() == frozenset()

    readme = world.alice.hf_hub_download("alice/signed-in", "README.md", local_dir=tmp_path / "c")
    stored = b"".join(p.read_bytes() for p in bot.settings.data_dir.rglob("*") if p.is_file())
    seen = [Path(readme).read_text(), *captured_logs, failed.reason or "", repr(bot.credentials)]
    seen += [j.spec.model_dump_json() for j in bot.store.all()]
    for secret in (ALICE_TOKEN, revoked):
        assert secret.encode() not in stored and secret not in "\n".join(seen)


def test_settings_read_only_the_bot_variables() -> None:
    env = {"HF_TOKEN": "hf_x", "WEBHOOK_SECRET": "w", "MERGEBOT_DATA": "/tmp/d", "HF_ENDPOINT": "http://h"}
    settings = Settings.from_env(env)
    assert settings.hf_endpoint == "http://h" and settings.database_url.startswith("sqlite:///")
    assert "hf_x" not in repr(settings) and settings.hf_token.get_secret_value() == "hf_x"
    assert Settings.from_env({**env, "MERGEBOT_DB_URL": "sqlite:///x.db"}).database_url == "sqlite:///x.db"
    with pytest.raises(SettingsError, match="HF_TOKEN, WEBHOOK_SECRET"):
        Settings.from_env({"MERGEBOT_DATA": "/tmp/d"})
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env, max_jobs_per_user=0)
    assert "max_jobs_per_user" in str(err.value) and "hf_x" not in str(err.value)


def test_hub_errors_carry_no_token(world: World, tmp_path: Path) -> None:
    secret = "hf_wrongSECRET_999999"
    hub = Hub(world.hub.endpoint, secret)
    with pytest.raises(BotError) as err:
        hub.whoami()
    assert secret not in str(err.value) and secret not in repr(hub)
    settings = make_settings(world, tmp_path)
    assert "SECRET" not in repr(settings)


def test_the_cli_log_filter_redacts() -> None:
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token is %s", (TOKENS[0],), None)
    assert RedactSecrets(TOKENS).filter(record)
    assert TOKENS[0] not in record.getMessage() and "***" in record.getMessage()
