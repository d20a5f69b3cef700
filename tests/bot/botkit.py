"""Helpers shared by the bot's tests (constants, the in-process server, payloads, waiting).

A module of its own, not conftest: `conftest` is not a unique module name across tests/.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from huggingface_hub import HfApi
from tiny_models import Family, ModelSpec

from bot.app import WEBHOOK_PATH, create_app
from bot.jobs import Job
from bot.service import Bot
from bot.settings import Settings
from localhub.server import LocalHubServer

BOT_TOKEN = "hf_botSECRETtoken_0123456789"
ALICE_TOKEN = "hf_aliceSECRETtoken_0123456789"
BOB_TOKEN = "hf_bobSECRETtoken_0123456789"
WEBHOOK_SECRET = "whsec_SECRET_0123456789"
TOKENS = (BOT_TOKEN, ALICE_TOKEN, BOB_TOKEN, WEBHOOK_SECRET)
BOT = "mergebot"


def card(license_: str, base_model: str | list[str] | None = None, extra: str = "") -> bytes:
    lines = ["---", f"license: {license_}"]
    if isinstance(base_model, str):
        lines.append(f"base_model: {base_model}")
    elif base_model:
        lines += ["base_model:", *[f"- {b}" for b in base_model]]
    return ("\n".join([*lines, extra, "---", "", "# A tiny test model", ""])).encode()


@dataclass
class World:
    """The shared localhub and what is on it."""

    hub: LocalHubServer
    family: Family
    alice: HfApi
    bob: HfApi
    bot_api: HfApi


def upload_model(api: HfApi, repo_id: str, folder: Path | None, readme: bytes, **create: Any) -> None:
    api.create_repo(repo_id, **create)
    if folder is not None:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=["README.md"])
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id)


BIG = ModelSpec(arch="llama", num_layers=24, hidden_size=64, intermediate_size=128, dtype="float32")


def make_settings(world: World, data: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "hf_endpoint": world.hub.endpoint,
        "hf_token": BOT_TOKEN,
        "webhook_secret": WEBHOOK_SECRET,
        "data_dir": data,
        "poll_interval_s": 0,
        "progress_interval_s": 0.05,
        "shard_bytes": 40_000,
    }
    values.update(overrides)
    return Settings.model_validate(values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BotServer:
    """The bot app on 127.0.0.1 in a thread (like localhub.testing)."""

    def __init__(self, bot: Bot, run_jobs: bool = True) -> None:
        self.bot = bot
        self.port = free_port()
        config = uvicorn.Config(
            create_app(bot, run_jobs=run_jobs),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def __enter__(self) -> BotServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the bot did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


BotFactory = Callable[..., BotServer]


def disable_webhook(hub: LocalHubServer, webhook_id: str) -> None:
    with hub.hub.db.write() as conn:
        found = hub.hub.webhooks.get(conn, webhook_id)
        assert found is not None
        hub.hub.webhooks.update(conn, found, disabled=True)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished_job(bot: Bot, destination: str, timeout: float = 60.0) -> Job:
    def done() -> Job | None:
        jobs = bot.store.all_for(destination)
        return jobs[-1] if jobs and jobs[-1].state in ("succeeded", "failed", "cancelled") else None

    job: Job = wait_for(done, timeout, f"a finished job for {destination}")
    return job


def merge_command(name: str, recipe: str, flags: str = "") -> str:
    return f"Hello! Please merge these.\n\n@{BOT} merge --name {name}{flags}\n```yaml\n{recipe}```\n"


RECIPE = (
    "merge_method: ties\nbase_model: acme/base\nmodels:\n"
    "  - model: alice/ft-mit\n    parameters: {weight: 0.6, density: 0.5}\n"
    "  - model: bob/ft-apache\n    parameters: {weight: 0.4, density: 0.8}\n"
    "dtype: float32\n"
)


def discussion_payload(
    repo: str, num: int, discussion_id: str, comment_id: str | None = None
) -> dict[str, Any]:
    """A v3 payload as the Hub sends it (ids only, no names)."""
    payload: dict[str, Any] = {
        "event": {"action": "create", "scope": "discussion.comment" if comment_id else "discussion"},
        "repo": {"type": "model", "name": repo, "id": "r1", "private": False, "owner": {"id": "o1"}},
        "discussion": {
            "id": discussion_id,
            "num": num,
            "title": "t",
            "isPullRequest": False,
            "status": "open",
            "author": {"id": "a1"},
        },
        "webhook": {"id": "w1", "version": 3},
    }
    if comment_id:
        payload["comment"] = {"id": comment_id, "author": {"id": "a1"}, "content": "...", "hidden": False}
    return payload
