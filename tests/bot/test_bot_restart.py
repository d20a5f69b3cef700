"""The bot as a subprocess (`mergebot bot serve`), killed with SIGKILL in the middle of a merge, then restarted:
the job runs again to the end and exactly one result is pushed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botkit import (
    BOT,
    BOT_TOKEN,
    TOKENS,
    WEBHOOK_SECRET,
    World,
    disable_webhook,
    free_port,
    merge_command,
    wait_for,
)

from bot.jobs import JobStore, make_engine


class BotProcess:
    def __init__(self, world: World, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhooks/mergebot"
        env = {
            **os.environ,
            "HF_ENDPOINT": world.hub.endpoint,
            "HF_TOKEN": BOT_TOKEN,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "MERGEBOT_DATA": str(data),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mergebot",
                "bot",
                "serve",
                "--port",
                str(self.port),
                "--poll-interval",
                "0",
                "--progress-interval",
                "0.2",
                "--shard-bytes",
                "300000",
                "--log-level",
                "debug",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        import httpx

        def up() -> bool:
            assert self.proc.poll() is None, "the bot exited"
            try:
                return (
                    httpx.get(self.url.replace("/webhooks/mergebot", "/health"), timeout=1).status_code == 200
                )
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the bot process")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def processes() -> Iterator[list[BotProcess]]:
    started: list[BotProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.stop()


def test_kill_during_a_merge_and_restart_gives_one_result(
    world: World, big_models: tuple[str, str], tmp_path: Path, processes: list[BotProcess]
) -> None:
    data, log = tmp_path / "data", tmp_path / "bot.log"
    first = BotProcess(world, data, log)
    processes.append(first)
    first.wait_ready()
    hook = world.hub.add_webhook(first.url, [f"model:{BOT}/requests"], secret=WEBHOOK_SECRET)
    base, ft = big_models
    recipe = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\nparameters:\n  t: 0.3\n"
    discussion = world.alice.create_discussion(
        f"{BOT}/requests", "big", description=merge_command("restarted", recipe)
    )
    store = JobStore(make_engine(f"sqlite:///{data / 'mergebot.sqlite'}"))
    running = wait_for(
        lambda: [j for j in store.all(states=("running",)) if 0.05 < j.progress < 0.7],
        60,
        "the merge to be under way",
    )
    first.kill()
    job_id = running[0].id
    assert store.get(job_id).state == "running"  # type: ignore[union-attr]
    assert not world.alice.repo_exists(f"{BOT}/restarted")  # nothing published: not even visible
    assert not world.bot_api.list_repo_commits(f"{BOT}/restarted")[0].title.startswith("Merge")

    disable_webhook(world.hub, hook.id)
    second = BotProcess(world, data, log)
    processes.append(second)
    second.wait_ready()
    done = wait_for(
        lambda: (j := store.get(job_id)) is not None and j.state in ("succeeded", "failed") and j,
        90,
        "the job",
    )
    assert done.state == "succeeded", done.reason
    commits = world.alice.list_repo_commits(f"{BOT}/restarted")
    assert len([c for c in commits if f"mergebot-job: {job_id}" in c.title]) == 1
    assert len(commits) == 2  # the repo's first commit and the merge
    assert len(store.all()) == 1

    def bot_comments() -> list[str]:
        events = world.alice.get_discussion_details(f"{BOT}/requests", discussion.num).events
        return [e.content for e in events if getattr(e, "author", None) == BOT]  # type: ignore[attr-defined]

    wait_for(lambda: any("is done" in c for c in bot_comments()), 30, "the done comment")
    assert len(bot_comments()) == 1  # the same status comment, edited by both processes
    files = world.alice.list_repo_files(f"{BOT}/restarted")
    assert "README.md" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    second.stop()
    text = log.read_text(errors="replace")
    assert "re-queued 1 job" in text
    for token in TOKENS:
        assert token not in text
