"""`mergebot bot setup`: the requests repo and the webhook, made once, against localhub."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi

from bot import cli
from bot.deploy import webhook_url
from localhub.testing import run_localhub

TOKEN = "tok-deploy-bot-0123456789"
SECRET = "setup-webhook-secret"


def test_setup_makes_the_requests_repo_and_one_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_localhub(tmp_path / "hub") as hub:
        hub.add_user("mergebot", TOKEN, orgs=["merge-lab"])
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
        argv = ["setup", "--url", "http://127.0.0.1:9", "--watch", "model:acme/base"]
        assert cli.main(argv) == 0
        assert cli.main(argv) == 0  # again: nothing new
        (hook,) = hub.hub.list_webhooks()
        assert hook.url == "http://127.0.0.1:9/webhooks/mergebot" and hook.secret == SECRET
        assert {(w.type, w.name) for w in hook.watched} == {("user", "mergebot"), ("model", "acme/base")}
        assert set(hook.domains) == {"repo", "discussion"}
        assert HfApi(endpoint=hub.endpoint, token=TOKEN).repo_exists("mergebot/requests")

        monkeypatch.setenv("MERGEBOT_NAMESPACE", "merge-lab")
        assert cli.main(["setup", "--space", "merge-lab/Merge_Bot"]) == 0
        lab = next(h for h in hub.hub.list_webhooks() if h.id != hook.id)
        assert lab.url == "https://merge-lab-merge-bot.hf.space/webhooks/mergebot"
        assert [(w.type, w.name) for w in lab.watched] == [("org", "merge-lab")]
        assert HfApi(endpoint=hub.endpoint, token=TOKEN).repo_exists("merge-lab/requests")

        assert cli.main(["setup", "--url", "http://x", "--watch", "planet:earth"]) == 2
    out = capsys.readouterr().out
    assert "Requests repo: merge-lab/requests" in out and "created" in out and "already there" in out
    assert "KIND:NAME" in out and TOKEN not in out and SECRET not in out


def test_webhook_url_of_a_space_or_an_address() -> None:
    assert webhook_url("org/My.Bot") == "https://org-my-bot.hf.space/webhooks/mergebot"
    assert webhook_url("https://bot.example.org/") == "https://bot.example.org/webhooks/mergebot"
    assert (
        webhook_url("https://bot.example.org/webhooks/mergebot")
        == "https://bot.example.org/webhooks/mergebot"
    )
