"""Signing in with Hugging Face, at the service level (the demo has no OAuth, so the test plays Gradio's
part and hands the service the profile's name and the token), and cancelling from the page.

- A signed-in user's merge is published in the user's namespace with the user's token (localhub
  refuses the bot's token there), and the token is never written: not in the job store's bytes,
  the logs, the card or the job's fields.
- After a restart the token is gone: the job waits in ``needs_sign_in`` (never published with the
  bot's token, never lost) until the same user signs in again and resumes it.
- Only the submitter (signed in) or the page session that submitted a job may cancel it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from pydantic import SecretStr

from bot.credentials import UserCredential
from bot.errors import BotError, JobNotFound
from bot.jobs import Job, new_guest
from mergebot.demo import DEMO_USER, demo_stack
from space.service import SpaceService
from space.views import queue_html, queue_rows

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
RECIPE = (
    "merge_method: ties\nbase_model: demo-lab/tiny-base\nmodels:\n"
    "  - model: demo-lab/tiny-math\n    parameters: {weight: 0.5, density: 0.5}\n"
    "dtype: bfloat16\n"
)


def finished(service: SpaceService, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while (job := service.bot.store.get(job_id)) is not None and job.state in ("queued", "running"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)
    assert job is not None
    return job


def test_signed_in_merge_waits_across_a_restart_and_lands_in_the_users_namespace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = None
    with demo_stack(tmp_path, progress_interval_s=0.05) as first:
        token = (tmp_path / "secrets" / "user-token").read_text().strip()
        me = UserCredential(DEMO_USER, SecretStr(token))
        service = SpaceService(first.bot)
        first.bot.queue.stop(wait=True)  # nothing runs: the job is still waiting when the process ends
        with pytest.raises(BotError, match="could not be confirmed"):  # a token of someone else
            service.submit(RECIPE, name="mine", signed_in=UserCredential("someone", SecretStr(token)))
        job = service.submit(RECIPE, name="mine", signed_in=me)
        assert job.spec.destination == f"{DEMO_USER}/mine" and job.spec.requester == DEMO_USER
        assert job.spec.credential == "user" and first.bot.credentials.held() == {job.id}
        assert service.check(RECIPE, name="mine", user=DEMO_USER).destination == f"{DEMO_USER}/mine"

    with demo_stack(tmp_path, progress_interval_s=0.05) as second:
        service = SpaceService(second.bot)
        waiting = second.bot.store.get(job.id)
        assert waiting is not None and waiting.state == "needs_sign_in"
        assert "sign in again" in (waiting.reason or "")
        time.sleep(0.3)  # the queue is running: the job must stay where it is
        assert second.bot.store.get(job.id).state == "needs_sign_in"  # type: ignore[union-attr]
        shown = queue_html(queue_rows(service.jobs(), service.hub_url))
        assert "sign in again to resume" in shown
        with pytest.raises(JobNotFound):  # only its requester resumes or cancels it
            service.resume(job.id, UserCredential("someone", SecretStr("hf_other")))
        with pytest.raises(JobNotFound):
            service.cancel(job.id, user="someone")
        resumed = service.resume(job.id, UserCredential(DEMO_USER, SecretStr(token)))
        assert resumed.state in ("queued", "running")
        done = finished(service, job.id)
        assert done.state == "succeeded", done.reason
        assert second.bot.credentials.held() == frozenset()  # forgotten once the job ended

        user_api = HfApi(endpoint=second.hub_url, token=token)
        assert user_api.model_info(f"{DEMO_USER}/mine").author == DEMO_USER
        commits = user_api.list_repo_commits(f"{DEMO_USER}/mine")
        merge = next(c for c in commits if "mergebot-job" in c.title)
        assert merge.authors == [DEMO_USER] and "mergebot" not in {a for c in commits for a in c.authors}
        assert not user_api.repo_exists("mergebot/mine")
        card = httpx.get(f"{second.hub_url}/{DEMO_USER}/mine/resolve/main/README.md").text
        assert "demo-lab/tiny-math" in card
        bot_token = (tmp_path / "secrets" / "bot-token").read_text().strip()
        with pytest.raises(Exception):  # noqa: B017 - localhub: the bot cannot write in the user's namespace
            HfApi(endpoint=second.hub_url, token=bot_token).create_repo(f"{DEMO_USER}/by-the-bot")

        stored = b"".join(p.read_bytes() for p in (tmp_path / "bot").rglob("*") if p.is_file())
        seen = [card, caplog.text, done.spec.model_dump_json(), repr(second.bot.credentials)]
        assert token.encode() not in stored and token not in "\n".join(seen)
        assert len(caplog.records) > 5


def test_cancel_from_the_page_only_for_the_submitter(tmp_path: Path) -> None:
    with demo_stack(tmp_path, progress_interval_s=0.05) as stack:
        service = SpaceService(stack.bot)
        stack.bot.queue.stop(wait=True)
        guest = service.submit(RECIPE, name="guest-job", requester=new_guest())
        token = (tmp_path / "secrets" / "user-token").read_text().strip()
        # signed in: a requester named without sign-in would be a guest (see test_bot_rights)
        ana = service.submit(RECIPE, name="ana-job", signed_in=UserCredential(DEMO_USER, SecretStr(token)))
        with pytest.raises(JobNotFound):  # another visitor's page session
            service.cancel(guest.id, user=None, session_jobs=[ana.id])
        with pytest.raises(JobNotFound):
            service.cancel("nope", user=None, session_jobs=["nope"])
        assert "Cancelled" in service.cancel(guest.id, user=None, session_jobs=[guest.id])
        assert stack.bot.store.get(guest.id).state == "cancelled"  # type: ignore[union-attr]
        assert "already cancelled" in service.cancel(guest.id, user=None, session_jobs=[guest.id])

        assert stack.bot.store.claim(ana.id)  # as if the worker had started it
        assert "stopping" in service.cancel(ana.id, user=DEMO_USER)  # signed in as its requester
        assert stack.bot.store.get(ana.id).cancel_requested  # type: ignore[union-attr]
        rows = queue_rows(service.jobs(), service.hub_url)
        assert [r.state for r in rows] == ["running", "cancelled"]
