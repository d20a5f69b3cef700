"""`mergebot space export OUT_DIR` and `mergebot space push REPO_ID`: deploy the Space.

``export`` writes a Space repo that builds on Hugging Face (see :mod:`space.deploy`); ``push``
exports into a temporary folder and creates or updates the Space with it, setting its
HF_TOKEN and WEBHOOK_SECRET secrets, and its MERGEBOT_NAMESPACE variable when it is set, from
the environment (against HF_ENDPOINT).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebot space", description="Deploy the mergebot Space.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the Space repo (code, README.md, app.py, requirements.txt)")
    export.add_argument("out_dir", type=Path, help="a new or empty folder")
    push = sub.add_parser("push", help="create or update the Space on the Hub, with its secrets")
    push.add_argument("repo_id", help="the Space, `owner/name`")
    push.add_argument("--hardware", default=None, help="request this hardware (e.g. t4-small; paid)")
    for command in (export, push):
        command.add_argument("--lock", type=Path, default=None, help="the exact versions to pin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))

    from huggingface_hub.utils import disable_progress_bars

    from bot.deploy import webhook_url
    from bot.errors import BotError
    from bot.hub import Hub
    from bot.settings import DeploySettings, secret_values
    from space.deploy import export_space, push_space

    try:
        if args.command == "export":
            out = export_space(args.out_dir, lock=args.lock, secrets=secret_values())
            print(f"Exported the Space to {out}. Next: `mergebot space push OWNER/NAME` (see README).")
            return 0
        settings = DeploySettings.from_env()
        disable_progress_bars()
        hub = Hub(settings.hf_endpoint, settings.hf_token.get_secret_value())
        with tempfile.TemporaryDirectory(prefix="mergebot-space-") as tmp:
            folder = export_space(Path(tmp) / "space", lock=args.lock, secrets=secret_values())
            push_space(
                hub,
                args.repo_id,
                folder,
                secrets={
                    "HF_TOKEN": settings.hf_token.get_secret_value(),
                    "WEBHOOK_SECRET": settings.webhook_secret.get_secret_value(),
                },
                variables={"MERGEBOT_NAMESPACE": settings.namespace} if settings.namespace else None,
                hardware=args.hardware,
            )
    except BotError as exc:
        print(f"mergebot space: {exc}", file=sys.stderr)
        return 2
    print(f"Pushed {hub.endpoint}/spaces/{args.repo_id} (secrets HF_TOKEN and WEBHOOK_SECRET set).")
    if args.hardware:
        print(f"Requested {args.hardware} hardware (billed to the Space's owner).")
    if settings.namespace:
        print(f"The Space publishes in {settings.namespace} (its variable MERGEBOT_NAMESPACE).")
    print(f"Next: `mergebot bot setup --space {args.repo_id}` (a webhook to {webhook_url(args.repo_id)}).")
    return 0
