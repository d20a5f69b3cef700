"""A merge that fails verification is reported as failed, and nothing is published."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from botkit import BOT, RECIPE, BotFactory, World, finished_job, merge_command

import engine.run
from engine.errors import VerificationError


def test_a_merge_that_fails_verification_is_not_published(
    world: World, serve_bot: BotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[Path] = []

    def refuse(folder: Path, shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
        checked.append(Path(folder))
        raise VerificationError(["transformers expects 1 tensors the output lacks: 'model.norm.weight'"])

    monkeypatch.setattr(engine.run, "check_loads", refuse)
    server = serve_bot()
    world.alice.create_discussion(
        f"{BOT}/requests", "Please merge", description=merge_command("unverified", RECIPE)
    )
    job = finished_job(server.bot, f"{BOT}/unverified")
    assert len(checked) == 1  # the worker asked for the check
    assert job.state == "failed"
    assert (
        job.reason is not None and "failed verification" in job.reason and "model.norm.weight" in job.reason
    )
    assert not world.alice.repo_exists(f"{BOT}/unverified")
