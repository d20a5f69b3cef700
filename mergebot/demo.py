"""`mergebot demo`: the whole service on this machine, with no account or network.

It starts localhub (a Hub-compatible server) in-process, seeds it with small demo models
(a base and fine-tunes under different licences, two generations of lineage, each with a
model card and a tokenizer) and an evaluation dataset (for the Evolve tab's searches), creates
a demo bot account and token there, and serves the bot (webhook and queue) and the Space (the
merge form) from one process. Open the printed URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOT_ACCOUNT = "mergebot"
DEMO_USER = "demo-user"


@dataclass(frozen=True)
class DemoStack:
    """What a running demo offers: the page, the Hub, and the models on it."""

    url: str  # the Space (and the bot's webhook under /webhooks/mergebot)
    hub_url: str  # localhub
    models: tuple[str, ...]  # the demo repos, base first
    bot: Any  # the bot.service.Bot serving the page and the webhook
    dataset: str = ""  # the evaluation dataset repo (eval.txt, qa.jsonl)
    requests_repo: str = ""  # where a discussion asks the bot for a merge
    user_token: str = ""  # the demo user's token on the local Hub (owns demo-lab)


class PortBusy(RuntimeError):
    """The page's port is taken by another program."""


def _check_port(host: str, port: int) -> None:
    """Raise :class:`PortBusy` when ``port`` cannot be bound on ``host``."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise PortBusy(f"port {port} on {host} is in use; choose another with --port") from None


def discussion_snippet(stack: DemoStack) -> str:
    """A copy-paste command that opens a merge request in the demo's requests repo."""
    base, tune = stack.models[0], stack.models[1]
    return f"""HF_HUB_DISABLE_XET=1 .venv/bin/python - <<'EOF'
from huggingface_hub import HfApi
api = HfApi(endpoint="{stack.hub_url}", token="{stack.user_token}")
recipe = "merge_method: slerp\\nbase_model: {base}\\nmodels:\\n  - model: {base}\\n  - model: {tune}\\nparameters:\\n  t: 0.5\\n"
d = api.create_discussion("{stack.requests_repo}", "A merge, please",
                          description=f"@{BOT_ACCOUNT} merge --name my-first-merge\\n```yaml\\n{{recipe}}```\\n")
print(f"{stack.hub_url}/{stack.requests_repo}/discussions/{{d.num}}")
EOF"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _read_or_make_token(path: Path, prefix: str) -> str:
    """A token kept in the data folder, so a restarted demo finds its accounts and jobs again."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    token = f"{prefix}{secrets.token_hex(16)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token, encoding="utf-8")
    path.chmod(0o600)
    return token


def seed_hub(endpoint: str, token: str, folder: Path) -> tuple[str, ...]:
    """Upload the demo family to the Hub at ``endpoint`` (repos that exist are left alone, except
    that a model from an older demo, without a tokenizer, gets one)."""
    from huggingface_hub import HfApi

    from mergebot.demo_models import DEMO_FAMILY, build_demo_models

    paths = build_demo_models(str(folder))
    api = HfApi(endpoint=endpoint, token=token)
    for model in DEMO_FAMILY:
        if api.file_exists(model.repo_id, "tokenizer.json"):
            continue
        api.create_repo(model.repo_id, exist_ok=True)
        api.upload_folder(repo_id=model.repo_id, folder_path=paths[model.name], commit_message="Demo model")
    return tuple(m.repo_id for m in DEMO_FAMILY)


def seed_dataset(endpoint: str, token: str, folder: Path) -> str:
    """Upload the demo evaluation dataset (left alone if it exists); returns its repo id."""
    from huggingface_hub import HfApi

    from mergebot.demo_models import DEMO_DATASET, build_demo_dataset

    api = HfApi(endpoint=endpoint, token=token)
    if not api.repo_exists(DEMO_DATASET, repo_type="dataset"):
        api.create_repo(DEMO_DATASET, repo_type="dataset")
        api.upload_folder(
            repo_id=DEMO_DATASET,
            repo_type="dataset",
            folder_path=build_demo_dataset(str(folder)),
            commit_message="Demo evaluation data",
        )
    return DEMO_DATASET


@contextmanager
def demo_stack(
    data: str | Path, *, host: str = "127.0.0.1", port: int = 0, **bot_settings: Any
) -> Iterator[DemoStack]:
    """Run localhub, the bot and the Space in this process until the block ends."""
    import uvicorn
    from huggingface_hub import HfApi

    from bot.service import Bot
    from bot.settings import Settings
    from localhub.testing import run_localhub
    from space.app import create_app

    if port:
        _check_port(host, port)  # before anything is built: a taken port is one line, at once
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    bot_token = _read_or_make_token(data / "secrets" / "bot-token", "hf_demo_bot_")
    user_token = _read_or_make_token(data / "secrets" / "user-token", "hf_demo_user_")
    webhook_secret = _read_or_make_token(data / "secrets" / "webhook-secret", "whsec_")
    with run_localhub(data / "localhub", host=host) as hub:
        hub.add_user(BOT_ACCOUNT, bot_token)
        hub.add_user(DEMO_USER, user_token, orgs=["demo-lab"])
        models = seed_hub(hub.endpoint, user_token, data / "models")
        dataset = seed_dataset(hub.endpoint, user_token, data / "datasets" / "eval-text")
        settings = Settings.model_validate(
            {
                "hf_endpoint": hub.endpoint,
                "hf_token": bot_token,
                "webhook_secret": webhook_secret,
                "data_dir": data / "bot",
                "poll_interval_s": 0,
                "progress_interval_s": 0.2,
                "device": "cpu",
                "shard_bytes": 200_000,
                **bot_settings,
            }
        )
        bot = Bot(settings)
        requests_repo = f"{BOT_ACCOUNT}/requests"  # the bot's inbox for discussion requests
        HfApi(endpoint=hub.endpoint, token=bot_token).create_repo(requests_repo, exist_ok=True)
        app = create_app(bot, models=models)
        port = port or _free_port(host)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", log_config=None)
        )
        thread = threading.Thread(target=server.run, name="mergebot-demo", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        hook = hub.hub.add_webhook(  # owned by the bot, which removes it when the demo stops
            f"http://{host}:{port}/webhooks/mergebot",
            [f"user:{BOT_ACCOUNT}"],
            secret=webhook_secret,
            owner=BOT_ACCOUNT,
        )
        try:
            yield DemoStack(
                url=f"http://{host}:{port}/",
                hub_url=hub.endpoint,
                models=models,
                bot=bot,
                dataset=dataset,
                requests_repo=requests_repo,
                user_token=user_token,
            )
        finally:
            try:  # the next start serves on another port: this hook would only fail
                HfApi(endpoint=hub.endpoint, token=bot_token).delete_webhook(hook.id)
            except Exception as exc:
                logging.getLogger(__name__).warning("demo webhook not removed: %s", type(exc).__name__)
            server.should_exit = True
            thread.join(timeout=30)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mergebot demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="demo-data", help="folder for the hub, the models and the job store"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=7860, help="port of the page")
    args = parser.parse_args(list(argv))
    # huggingface_hub reads these at import; localhub serves no Xet storage.
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    print("Starting the demo: a local Hub with demo models, the merge bot and its Space…", flush=True)
    try:
        return _serve(args)
    except PortBusy as exc:  # raised before anything is served
        print(f"mergebot demo: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    with demo_stack(args.data, host=args.host, port=args.port) as stack:
        print(f"\n  Open {stack.url} in your browser.\n", flush=True)
        print(f"  Local Hub: {stack.hub_url} (demo models: {', '.join(stack.models)};")
        print(f"  evaluation data for the Evolve tab: datasets/{stack.dataset})")
        print(f"  Demo user: {DEMO_USER}, token {stack.user_token}")
        print(f"\n  Ask the bot in a discussion of {stack.hub_url}/{stack.requests_repo}: paste this in a shell")
        print("  (it prints the discussion's address; the bot answers there in a few seconds):\n")
        print(discussion_snippet(stack))
        print(f"\n  State is kept in {Path(args.data).resolve()}; press Ctrl+C to stop.\n", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("Stopping.")
    return 0
