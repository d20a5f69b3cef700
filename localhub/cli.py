"""`localhub` / `mergebot hub`: serve a data folder, and add users and webhooks to it (also while it runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from localhub.config import HubConfig, RateLimit, RateLimitedAction
from localhub.errors import LocalHubError
from localhub.webhooks import DOMAINS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localhub", description="A Hugging Face Hub-compatible server for tests and offline use."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a data folder over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--data", type=Path, required=True, help="folder holding the hub's state (created if missing)"
    )
    serve.add_argument("--max-upload-bytes", type=int, default=None, help="refuse files larger than this")
    serve.add_argument(
        "--rate-limit",
        action="append",
        default=[],
        type=parse_rate_limit,
        metavar="ACTION=N/SECONDS",
        help="answer 429 past N requests of ACTION (comment, edit, commit, whoami) per account per window",
    )
    serve.add_argument(
        "--webhook-daily-limit", type=int, default=None, help="deliveries per webhook per 24 h (default 1000)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )

    user = sub.add_parser("add-user", help="add a user (or a token to an existing user)")
    user.add_argument("--data", type=Path, required=True)
    user.add_argument("name")
    user.add_argument("--token", required=True, help="the Bearer token the user will send")
    user.add_argument("--org", action="append", default=[], help="make the user a member of ORG (repeatable)")
    user.add_argument("--read-only", action="store_true", help="the token may read but not write")

    hook = sub.add_parser(
        "add-webhook", help="POST the Hub's webhook payloads to URL on changes to watched repos"
    )
    hook.add_argument("--data", type=Path, required=True)
    hook.add_argument("--url", required=True)
    hook.add_argument("--secret", default=None, help="sent as the X-Webhook-Secret header")
    hook.add_argument(
        "--watch",
        action="append",
        required=True,
        help="model:NS/NAME, dataset:NS/NAME, space:NS/NAME, user:NAME or org:NAME (repeatable)",
    )
    hook.add_argument(
        "--domain", action="append", choices=list(DOMAINS), help="repo and/or discussion (default: both)"
    )
    replay = sub.add_parser("replay-delivery", help="send a webhook delivery again (the Hub's manual replay)")
    replay.add_argument("--data", type=Path, required=True)
    replay.add_argument("delivery", type=int, help="the delivery's id in the delivery log")
    return parser


def parse_rate_limit(text: str) -> tuple[RateLimitedAction, RateLimit]:
    """``comment=10/60`` -> (``comment``, at most 10 per 60 s).

    Raises:
        argparse.ArgumentTypeError: not of that form, or an unknown action.
    """
    action, _, rest = text.partition("=")
    requests, _, seconds = rest.partition("/")
    actions = get_args(RateLimitedAction)
    try:
        if action not in actions:
            raise ValueError(action)
        return action, RateLimit(requests=int(requests), window_seconds=float(seconds))  # type: ignore[return-value]
    except (ValueError, ValidationError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use ACTION=N/SECONDS with ACTION one of {', '.join(actions)}, e.g. comment=10/60"
        ) from None


def main(argv: Sequence[str]) -> int:
    """Run one `localhub` command; return the exit status."""
    args = _parser().parse_args(list(argv))
    from localhub.hub import LocalHub

    try:
        if args.command == "serve":
            from localhub.server import LocalHubServer

            settings: dict[str, Any] = {"rate_limits": dict(args.rate_limit)}
            if args.max_upload_bytes:
                settings["max_upload_bytes"] = args.max_upload_bytes
            if args.webhook_daily_limit:
                settings["webhook_daily_limit"] = args.webhook_daily_limit
            server = LocalHubServer(
                HubConfig(data_dir=args.data, **settings),
                host=args.host,
                port=args.port,
                log_level=args.log_level,
            )
            print(f"localhub: serving {args.data} on http://{args.host}:{args.port}", flush=True)
            server.serve_forever()
            return 0
        hub = LocalHub(HubConfig(data_dir=args.data))
        if args.command == "add-user":
            hub.add_user(args.name, args.token, orgs=args.org, role="read" if args.read_only else "write")
            orgs = f" (member of {', '.join(args.org)})" if args.org else ""
            print(f"localhub: user {args.name}{orgs} can now use its token")
            return 0
        if args.command == "replay-delivery":
            delivery = hub.replay_delivery(args.delivery)  # a running server sends it within a second
            print(f"localhub: delivery {delivery.id} will be sent again to webhook {delivery.webhook_id}")
            return 0
        webhook = hub.add_webhook(args.url, args.watch, secret=args.secret, domains=args.domain or DOMAINS)
        print(f"localhub: webhook {webhook.id} -> {webhook.url}")
        return 0
    except LocalHubError as exc:
        print(f"localhub: {exc.message}", file=sys.stderr)
        return 2
