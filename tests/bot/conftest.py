"""Fixtures for the bot's tests: one localhub with tiny models of several licences and two
generations of lineage, and the bot served in-process on 127.0.0.1. Helpers live in botkit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botkit import (
    ALICE_TOKEN,
    BIG,
    BOB_TOKEN,
    BOT,
    BOT_TOKEN,
    WEBHOOK_SECRET,
    BotFactory,
    BotServer,
    World,
    card,
    disable_webhook,
    make_settings,
    upload_model,
)
from huggingface_hub import HfApi
from tiny_models import Family

from bot.service import Bot
from localhub.testing import run_localhub


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, llama_family: Family) -> Iterator[World]:
    """acme/grandbase (card only) <- acme/base (apache-2.0) <- alice/ft-mit (mit), bob/ft-apache;
    plus parents under no-derivatives, llama3, gemma and `other` licences, and a gated one."""
    with run_localhub(tmp_path_factory.mktemp("bot-hub")) as hub:  # as the Hub: no redelivery
        hub.add_user(BOT, BOT_TOKEN)
        hub.add_user("alice", ALICE_TOKEN, orgs=["acme"])
        hub.add_user("bob", BOB_TOKEN)
        alice = HfApi(endpoint=hub.endpoint, token=ALICE_TOKEN)
        bob = HfApi(endpoint=hub.endpoint, token=BOB_TOKEN)
        bot_api = HfApi(endpoint=hub.endpoint, token=BOT_TOKEN)
        base, ft = llama_family.base, llama_family.finetunes
        upload_model(alice, "acme/grandbase", None, card("apache-2.0"))
        upload_model(alice, "acme/base", base, card("apache-2.0", "acme/grandbase"))
        upload_model(alice, "alice/ft-mit", ft[0], card("mit", "acme/base"))
        upload_model(bob, "bob/ft-apache", ft[1], card("apache-2.0", ["acme/base", "bob/missing-parent"]))
        upload_model(bob, "bob/ft-nd", ft[2], card("cc-by-nd-4.0", "acme/base"))
        upload_model(alice, "alice/ft-llama", ft[2], card("llama3", "acme/base"))
        upload_model(bob, "bob/ft-gemma", ft[1], card("gemma", "acme/base"))
        upload_model(
            bob,
            "bob/ft-other",
            ft[2],
            card("other", "acme/base", "license_name: custom-terms\nlicense_link: LICENSE"),
        )
        bot_api.create_repo(f"{BOT}/requests")
        yield World(hub, llama_family, alice, bob, bot_api)


@pytest.fixture(scope="session")
def big_models(world: World, family_factory: Callable[..., Family]) -> tuple[str, str]:
    """Two models large enough (200+ tensors) that a merge takes seconds: to act in the middle of one."""
    family = family_factory(BIG, n_finetunes=1, seed=21)
    upload_model(world.alice, "acme/big-base", family.base, card("apache-2.0"))
    upload_model(world.alice, "alice/big-ft", family.finetunes[0], card("mit", "acme/big-base"))
    return "acme/big-base", "alice/big-ft"


@pytest.fixture
def serve_bot(world: World, tmp_path: Path) -> Iterator[BotFactory]:
    """Start the bot in-process, with a localhub webhook to it; both are torn down after the test."""
    stack: list[tuple[BotServer, Any]] = []

    def start(
        *,
        webhook: bool = True,
        run_jobs: bool = True,
        watch: tuple[str, ...] = (f"user:{BOT}",),
        **settings: Any,
    ) -> BotServer:
        server = BotServer(
            Bot(make_settings(world, tmp_path / f"bot{len(stack)}", **settings)), run_jobs=run_jobs
        )
        server.__enter__()
        hook = world.hub.add_webhook(server.url, list(watch), secret=WEBHOOK_SECRET) if webhook else None
        stack.append((server, hook))
        return server

    yield start
    for server, hook in reversed(stack):
        if hook is not None:
            disable_webhook(world.hub, hook.id)
        server.__exit__()


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every log line (any logger, any level) formatted as the CLI does."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture(scope="session", autouse=True)
def _quiet_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
