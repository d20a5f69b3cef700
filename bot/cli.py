"""`mergebot bot serve --host H --port P`: the webhook listener, the job queue and the worker in one process."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


class RedactSecrets(logging.Filter):
    """Replaces the given secrets in every log record (a second line of defence: nothing logs them)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self._secrets):
            for s in self._secrets:
                message = message.replace(s, "***")
            record.msg, record.args = message, None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergebot bot", description="Run the merge bot.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the webhook at /webhooks/mergebot and run the job queue")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--poll-interval", type=float, default=None, help="seconds between polls (0: none)")
    serve.add_argument("--progress-interval", type=float, default=None, help="fewest seconds between progress edits")
    serve.add_argument("--shard-bytes", type=int, default=None, help="bytes per output shard")
    setup = sub.add_parser("setup", help="create the requests repo and the Hub webhook to the bot")
    where = setup.add_mutually_exclusive_group(required=True)
    where.add_argument("--space", help="the bot's Space, `owner/name` (its webhook is on *.hf.space)")
    where.add_argument("--url", help="the bot's address, e.g. https://bot.example.org")
    setup.add_argument(
        "--watch", action="append", default=[], help="also watch KIND:NAME (e.g. model:org/base), repeatable"
    )
    args = parser.parse_args(list(argv or []))
    if args.command == "setup":
        return _setup(args.space or args.url, args.watch)

    import uvicorn
    from huggingface_hub.utils import disable_progress_bars

    from bot.app import create_app
    from bot.errors import BotError
    from bot.service import Bot
    from bot.settings import Settings

    overrides = {
        k: v
        for k, v in (
            ("poll_interval_s", args.poll_interval),
            ("progress_interval_s", args.progress_interval),
            ("shard_bytes", args.shard_bytes),
        )
        if v is not None
    }
    try:
        settings = Settings.from_env(**overrides)
    except BotError as exc:
        print(f"mergebot bot: {exc}")
        return 2
    handler = logging.StreamHandler()
    handler.addFilter(
        RedactSecrets([settings.hf_token.get_secret_value(), settings.webhook_secret.get_secret_value()])
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    disable_progress_bars()  # a service logs; it draws no progress bars
    app = create_app(Bot(settings))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    return 0


def _setup(space_or_url: str, watch: Sequence[str]) -> int:
    from huggingface_hub.utils import disable_progress_bars

    from bot.deploy import parse_watch, setup_bot, webhook_url
    from bot.errors import BotError
    from bot.hub import Hub
    from bot.settings import DeploySettings

    disable_progress_bars()
    try:
        settings = DeploySettings.from_env()
        report = setup_bot(
            Hub(settings.hf_endpoint, settings.hf_token.get_secret_value()),
            url=webhook_url(space_or_url),
            secret=settings.webhook_secret.get_secret_value(),
            namespace=settings.namespace,
            watch=[parse_watch(w) for w in watch],
        )
    except BotError as exc:
        print(f"mergebot bot setup: {exc}")
        return 2
    print("\n".join(report.lines()))
    return 0
