"""The Space's entry point (``app_file``): the page, the bot's webhook and its queue in one process.

Configured like the bot (bot.settings): HF_TOKEN (the bot's account), WEBHOOK_SECRET, and
optionally MERGEBOT_NAMESPACE (an organisation to publish in), HF_ENDPOINT and MERGEBOT_DATA
(a Space's disk is ephemeral: without it, the state lives in a cache folder until a restart).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):  # run as `python space/serve.py`, as Spaces do: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PORT = 7860  # the port a Space serves


def address(environ: Mapping[str, str]) -> tuple[str, int]:
    """Where to listen: gradio's own ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT``, as a Space sets them.

    Defaults: every interface, port 7860. ``GRADIO_SERVER_PORT=0`` lets the system pick a free port.
    """
    port = environ.get("GRADIO_SERVER_PORT", "")
    return environ.get("GRADIO_SERVER_NAME") or "0.0.0.0", int(port) if port.isdigit() else PORT


def main(host: str | None = None, port: int | None = None) -> int:
    """Serve the page, the webhook and the queue until stopped; 2 when the environment is unusable."""
    import uvicorn
    from gradio.utils import get_space
    from huggingface_hub.utils import disable_progress_bars

    from bot.cli import RedactSecrets
    from bot.errors import BotError
    from bot.service import Bot
    from bot.settings import Settings
    from space.app import create_app

    default_host, default_port = address(os.environ)
    host = default_host if host is None else host
    port = default_port if port is None else port
    try:
        settings = Settings.from_env()
    except BotError as exc:
        print(f"mergebot Space: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.addFilter(
        RedactSecrets([settings.hf_token.get_secret_value(), settings.webhook_secret.get_secret_value()])
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    disable_progress_bars()
    try:
        bot = Bot(settings)
        # "Sign in with Hugging Face" only where the Hub provides OAuth (a Space with hf_oauth: true)
        app = create_app(bot, oauth=get_space() is not None)
    except OSError as exc:  # the state folder was writable a moment ago; say so rather than a traceback
        print(
            f"mergebot Space: cannot use the state folder {settings.data_dir}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    except BotError as exc:  # the Hub refused the token (the message names no secret)
        print(f"mergebot Space: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host, port=port, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
