"""The Space as Hugging Face builds it: `mergebot space export`, its requirements, its start, and `push`.

The build is simulated as Spaces run it: requirements resolve on their own (exact pins of the
lock, nothing from the checkout), then `python app.py` starts in a folder holding only the
export, as a user who cannot write there, with no MERGEBOT_DATA and an empty HOME.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from huggingface_hub import HfApi

from localhub.testing import run_localhub
from space import cli as space_cli
from space.deploy import PROJECT, DeployError, export_space, read_lock

CHROMIUM = Path("/usr/bin/chromium")
BOT, BOT_TOKEN = "mergebot", "tok-mergebot-deploy-0123456789"
SECRET = "webhook-secret-for-the-deploy-test"
SCOPES = {"openid", "profile", "email", "read-repos", "write-repos", "contribute-repos", "manage-repos"}
SCOPES |= {"inference-api", "jobs", "webhooks", "read-billing"}


@pytest.fixture(scope="module")
def lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's lock; in a checkout without one, the installed versions written as a lock."""
    if (PROJECT / "requirements.lock").is_file():
        return PROJECT / "requirements.lock"
    path = tmp_path_factory.mktemp("lock") / "requirements.lock"
    pins = sorted(
        {f"{d.metadata['Name']}=={d.version.split('+')[0]}" for d in importlib.metadata.distributions()}
    )
    path.write_text("\n".join(pins) + "\n")
    return path


@pytest.fixture(scope="module")
def exported(lock: Path) -> Iterator[Path]:
    """An export in a world-readable folder (the unprivileged user starting it must read it)."""
    root = Path(tempfile.mkdtemp(prefix="mergebot-space-export-"))
    root.chmod(0o755)
    try:
        yield export_space(root / "space", lock=lock)
    finally:
        shutil.rmtree(root)


def _front_matter(readme: str) -> dict[str, Any]:
    _, meta, _ = readme.split("---\n", 2)
    loaded: dict[str, Any] = yaml.safe_load(meta)
    return loaded


def test_the_export_is_a_space_repo_with_its_own_code(exported: Path, lock: Path) -> None:
    meta = _front_matter((exported / "README.md").read_text())
    versions = read_lock(lock)
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == versions["gradio"]
    assert (exported / meta["app_file"]).is_file() and meta["app_file"] == "app.py"
    assert meta["hf_oauth"] is True and set(meta["hf_oauth_scopes"]) <= SCOPES
    # least privilege: the Space creates repos for the user and writes only to those
    assert "contribute-repos" in meta["hf_oauth_scopes"]
    assert not {"write-repos", "manage-repos"} & set(meta["hf_oauth_scopes"])
    assert meta["suggested_hardware"] and "suggested_storage" not in meta
    for package in ("engine", "bot", "space", "mergebot", "model_card_templates"):
        assert (exported / package).is_dir(), package
    assert (exported / "space" / "serve.py").is_file() and any((exported / "model_card_templates").iterdir())
    files = [p.relative_to(exported) for p in exported.rglob("*") if p.is_file()]
    skipped = {"tests", ".venv", ".cache", "__pycache__", "demo-data", "localhub", "benchmarks"}
    assert not [f for f in files if skipped & set(f.parts) or f.suffix in (".pyc", ".sqlite", ".db")]
    assert not (exported / "space" / "requirements.txt").exists()


def test_requirements_are_exact_pins_of_the_lock(exported: Path, lock: Path) -> None:
    versions = read_lock(lock)
    lines = [
        line.strip()
        for line in (exported / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = set()
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[a-z,]+\])?==([^\s;]+)", line)
        assert match is not None, f"not an exact pin: {line}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert versions.get(name) == match.group(3), line
        names.add(name)
    assert {"torch", "gradio", "transformers", "huggingface-hub", "optuna"} <= names
    # what they depend on is pinned too, and nothing only the tests use
    assert {"numpy", "starlette", "tokenizers", "pydantic-core"} <= names
    assert not {"pytest", "mergekit", "playwright", "ruff", "mypy"} & names


@pytest.mark.slow
def test_requirements_install_in_an_empty_folder(exported: Path, tmp_path: Path) -> None:
    empty = tmp_path / "build"
    empty.mkdir()
    shutil.copyfile(exported / "requirements.txt", empty / "requirements.txt")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q"]
    done = subprocess.run(
        [*pip, "-r", "requirements.txt"],
        cwd=empty,
        capture_output=True,
        text=True,
        timeout=300,
    )
    unreachable = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution")
    if done.returncode != 0 and any(s in done.stdout + done.stderr for s in unreachable):
        pytest.skip("pip cannot reach a package index")
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_export_that_would_hold_a_secret_is_refused(lock: Path, tmp_path: Path) -> None:
    # a "secret" that the card really holds stands for a token pasted into the project
    with pytest.raises(DeployError, match=r"README\.md` holds a token or a secret"):
        export_space(tmp_path / "out", lock=lock, secrets=("Merge fine-tuned models on the Hub",))
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DeployError, match="not an empty folder"):
        export_space(tmp_path / "full", lock=lock)
    with pytest.raises(DeployError, match="not a mergebot checkout"):
        export_space(tmp_path / "out", project=tmp_path / "full", lock=lock)


def _unprivileged(home: Path) -> dict[str, Any]:
    """Run as `nobody` when the tests run as root (a Space's app never runs as root).

    Only where `nobody` can run this interpreter: a virtual environment made from a Python
    under /root cannot be, and then the app runs as the current user.
    """
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setgroups([])
        os.setuid(user.pw_uid)

    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return {}
    os.chown(home, user.pw_uid, user.pw_gid)
    return {"preexec_fn": drop}


def _lines(stream: Any, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
def test_the_exported_app_starts_on_a_bare_disk(exported: Path, tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="mergebot-space-home-"))
    with run_localhub(tmp_path / "hub") as hub:
        hub.add_user(BOT, BOT_TOKEN)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "PYTHONPATH": str(exported),  # the exported code only, never the checkout
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": BOT_TOKEN,
            "WEBHOOK_SECRET": SECRET,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": "0",
        }
        probe = (
            "import importlib.util as u; print(*(u.find_spec(m).origin for m in ('space', 'bot', 'engine')))"
        )
        origins = subprocess.run(
            [sys.executable, "-c", probe], cwd=exported, env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(origins) == 3 and all(Path(o).is_relative_to(exported) for o in origins), origins
        process = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=exported,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **_unprivileged(home),
        )
        output: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_lines, args=(process.stdout, output), daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            url = None
            while url is None:
                try:
                    line = output.get(timeout=60)
                except queue.Empty:
                    pytest.fail("the app did not start:\n" + "".join(seen))
                seen.append(line)
                found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                url = found.group(1) if found else None
                assert process.poll() is None, "the app exited:\n" + "".join(seen)
            page = httpx.get(f"{url}/", follow_redirects=True, timeout=30)
            assert page.status_code == 200
            health = httpx.get(f"{url}/health", timeout=30)
            assert health.status_code == 200 and health.json() == {"status": "ok", "bot": BOT}
            imported = httpx.get(f"{url}/", follow_redirects=True, timeout=30).text
            assert "mergebot" in imported
            if CHROMIUM.exists():
                from playwright.sync_api import sync_playwright

                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
                    tab = browser.new_page()
                    tab.goto(url)
                    tab.wait_for_selector("text=Compose", timeout=30_000)
                    assert tab.title() == "mergebot"
                    browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
            reader.join(timeout=30)  # it ends at the pipe's end, now the app has exited
            assert process.stdout is not None
            process.stdout.close()
            while not output.empty():
                seen.append(output.get())
    log = "".join(seen)
    assert "MERGEBOT_DATA is not set" in log and str(home / ".cache" / "mergebot") in log
    assert (home / ".cache" / "mergebot" / "mergebot.sqlite").is_file()
    assert BOT_TOKEN not in log and SECRET not in log
    shutil.rmtree(home, ignore_errors=True)


def test_push_creates_the_space_with_its_secrets(
    lock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_localhub(tmp_path / "hub") as hub:
        hub.add_user(BOT, BOT_TOKEN)
        api = HfApi(endpoint=hub.endpoint, token=BOT_TOKEN)
        api.create_repo(f"{BOT}/space", repo_type="space", space_sdk="gradio")
        api.upload_file(
            path_or_fileobj=b"old", path_in_repo="stale.py", repo_id=f"{BOT}/space", repo_type="space"
        )
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", BOT_TOKEN)
        monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
        argv = ["push", f"{BOT}/space", "--lock", str(lock), "--hardware", "t4-small"]
        assert space_cli.main(argv) == 0
        files = set(api.list_repo_files(f"{BOT}/space", repo_type="space"))
        assert {"README.md", "app.py", "requirements.txt", "space/serve.py", "bot/hub.py"} <= files
        assert "stale.py" not in files and not any(f.startswith(("tests/", "localhub/")) for f in files)
        assert hub.hub.spaces.secrets(f"{BOT}/space") == {"HF_TOKEN": BOT_TOKEN, "WEBHOOK_SECRET": SECRET}
        assert hub.hub.spaces.runtime(f"{BOT}/space")["hardware"]["requested"] == "t4-small"
        assert hub.hub.spaces.variables(f"{BOT}/space") == {}
        monkeypatch.setenv("MERGEBOT_NAMESPACE", "merge-lab")
        assert space_cli.main(["push", f"{BOT}/new-space", "--lock", str(lock)]) == 0
        assert api.space_info(f"{BOT}/new-space").sdk == "gradio"
        assert hub.hub.spaces.runtime(f"{BOT}/new-space")["hardware"]["requested"] is None
        assert hub.hub.spaces.variables(f"{BOT}/new-space") == {"MERGEBOT_NAMESPACE": "merge-lab"}
        monkeypatch.setenv("HF_TOKEN", "tok-nobody-knows-this")
        assert space_cli.main(["push", f"{BOT}/space", "--lock", str(lock)]) == 2
    out = capsys.readouterr()
    assert "mergebot space:" in out.err and "Traceback" not in out.err
    assert BOT_TOKEN not in out.out + out.err and SECRET not in out.out + out.err
    assert "mergebot bot setup --space mergebot/space" in out.out
