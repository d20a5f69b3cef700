"""The demo teaches the discussion path: its printed snippet opens a request the bot answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from mergebot.demo import BOT_ACCOUNT, DemoStack, demo_stack, discussion_snippet

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    with demo_stack(tmp_path_factory.mktemp("demo-discussion"), progress_interval_s=0.05) as s:
        yield s


def test_the_printed_snippet_opens_a_merge_the_bot_publishes(stack: DemoStack) -> None:
    snippet = discussion_snippet(stack).replace(".venv/bin/python", sys.executable)
    done = subprocess.run(["bash", "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{stack.requests_repo}/discussions/" in done.stdout
    api = HfApi(endpoint=stack.hub_url, token=stack.user_token)
    num = int(done.stdout.strip().rsplit("/", 1)[1])

    def finished_reply() -> str | None:
        details = api.get_discussion_details(stack.requests_repo, num)
        texts = [e.content for e in details.events if getattr(e, "author", "") == BOT_ACCOUNT]
        return next((t for t in texts if "✅" in t or "❌" in t), None)

    deadline = time.monotonic() + 120
    while (reply := finished_reply()) is None:
        assert time.monotonic() < deadline, "the bot never finished the job"
        time.sleep(0.2)
    assert "✅" in reply and f"{BOT_ACCOUNT}/my-first-merge" in reply, reply
    assert api.repo_exists(f"{BOT_ACCOUNT}/my-first-merge")


def test_a_busy_port_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "mergebot", "demo", "--port", str(port), "--data", str(tmp_path / "d")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mergebot demo: port {port} on 127.0.0.1 is in use; choose another with --port"
    ]
    assert not (tmp_path / "d").exists()
