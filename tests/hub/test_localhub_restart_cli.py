"""State survives a restart; the CLI serves and administers a data folder, also while it runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from localhub.cli import main
from localhub.testing import run_localhub

TOKEN = "tok-rita-123456"


def test_everything_is_still_there_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    weights = os.urandom(50_000)
    with run_localhub(data) as first:
        first.add_user("rita", TOKEN, orgs=["lab"])
        api = HfApi(endpoint=first.endpoint, token=TOKEN)
        api.create_repo("lab/kept")
        api.create_repo("lab/secret", private=True)
        api.create_commit(
            "lab/kept",
            [
                CommitOperationAdd("README.md", b"---\nbase_model: x/y\n---\n"),
                CommitOperationAdd("w.safetensors", weights),
            ],
            commit_message="weights",
        )
        api.create_branch("lab/kept", branch="dev")
        pr = api.create_commit(
            "lab/kept", [CommitOperationAdd("p.txt", b"p")], commit_message="PR", create_pr=True
        )
        api.comment_discussion("lab/kept", pr.pr_num, "comment before restart")  # type: ignore[arg-type]
        webhook = first.add_webhook("http://127.0.0.1:9/x", ["org:lab"])
        sha_before = api.model_info("lab/kept").sha
    with run_localhub(data) as second:
        api = HfApi(endpoint=second.endpoint, token=TOKEN)
        assert api.whoami()["name"] == "rita"
        info = api.model_info("lab/kept")
        assert info.sha == sha_before and "base_model:x/y" in (info.tags or [])
        path = hf_hub_download(
            "lab/kept", "w.safetensors", endpoint=second.endpoint, cache_dir=tmp_path / "c"
        )
        assert Path(path).read_bytes() == weights
        assert {b.name for b in api.list_repo_refs("lab/kept").branches} == {"main", "dev"}
        details = api.get_discussion_details("lab/kept", pr.pr_num)  # type: ignore[arg-type]
        assert details.events[-1].content == "comment before restart"  # type: ignore[attr-defined]
        assert api.model_info("lab/secret").private
        assert [w.id for w in second.hub.list_webhooks()] == [webhook.id]
        api.upload_file(path_or_fileobj=b"after", path_in_repo="after.txt", repo_id="lab/kept")
        assert len(api.list_repo_commits("lab/kept")) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_subprocess_and_add_user_while_running(tmp_path: Path) -> None:
    data = tmp_path / "cli-data"
    assert main(["add-user", "--data", str(data), "sam", "--token", "tok-sam-123456", "--org", "team"]) == 0
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localhub",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        api = HfApi(endpoint=endpoint, token="tok-sam-123456")
        deadline = time.monotonic() + 20
        while True:
            try:
                assert api.whoami()["orgs"][0]["name"] == "team"
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        api.create_repo("team/from-cli")
        # while the server runs, another process adds a user and a webhook to the same folder
        assert main(["add-user", "--data", str(data), "tim", "--token", "tok-tim-123456"]) == 0
        assert (
            main(["add-webhook", "--data", str(data), "--url", "http://127.0.0.1:9/h", "--watch", "org:team"])
            == 0
        )
        assert HfApi(endpoint=endpoint, token="tok-tim-123456").whoami()["name"] == "tim"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
        assert proc.stdout is not None
    assert proc.returncode in (0, -15), output.decode()


def test_cli_reports_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["add-webhook", "--data", str(tmp_path), "--url", "http://x", "--watch", "galaxy:far"]) == 2
    assert "Invalid watch" in capsys.readouterr().err
