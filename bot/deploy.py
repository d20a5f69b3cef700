"""`mergebot bot setup`: what the bot needs on the Hub before its first request.

The requests repo (``<namespace>/requests``, whose discussions take requests) and one webhook
(repo and discussion events of the bot's namespace, and of the parents to re-merge on change)
to the bot's ``/webhooks/mergebot``, signed with WEBHOOK_SECRET. Safe to run again: an
existing repo or webhook to the same URL is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.errors import BotError
from bot.hub import Hub

WEBHOOK_PATH = "/webhooks/mergebot"
WATCH_KINDS = ("model", "dataset", "space", "user", "org")


@dataclass(frozen=True)
class SetupReport:
    """What ``setup_bot`` found or made."""

    bot: str
    requests_repo: str
    webhook_id: str
    webhook_created: bool
    watched: tuple[tuple[str, str], ...]

    def lines(self) -> list[str]:
        """The report for a person, ending with what remains to do."""
        hook = "created" if self.webhook_created else "already there, kept"
        return [
            f"Bot account: {self.bot}",
            f"Requests repo: {self.requests_repo}",
            f"Webhook {self.webhook_id} ({hook}), watching: "
            + ", ".join(f"{kind} {name}" for kind, name in self.watched),
            "",
            "What remains:",
            "- Check that the Space (or `mergebot bot serve`) runs: its /health answers.",
            f"- Ask for a merge in a discussion of {self.requests_repo} (`@{self.bot} help` lists the commands).",
        ]


def parse_watch(item: str) -> tuple[str, str]:
    """``kind:name`` (e.g. ``model:org/base``) as a pair.

    Raises:
        BotError: not ``kind:name`` with a kind the Hub watches.
    """
    kind, sep, name = item.partition(":")
    if not sep or kind not in WATCH_KINDS or not name:
        raise BotError(f"`{item}` is not KIND:NAME with KIND one of {', '.join(WATCH_KINDS)}.")
    return kind, name


def webhook_url(space_or_url: str) -> str:
    """The bot's webhook address: a URL as given, or a Space ``owner/name``'s ``*.hf.space`` one."""
    if "://" in space_or_url:
        return space_or_url.rstrip("/") + (
            "" if space_or_url.rstrip("/").endswith(WEBHOOK_PATH) else WEBHOOK_PATH
        )
    host = space_or_url.lower().replace("/", "-").replace("_", "-").replace(".", "-")
    return f"https://{host}.hf.space{WEBHOOK_PATH}"


def setup_bot(
    hub: Hub, *, url: str, secret: str, namespace: str | None = None, watch: Sequence[tuple[str, str]] = ()
) -> SetupReport:
    """Create the requests repo and the webhook, unless they exist.

    Args:
        url: where the Hub posts events (the bot's ``/webhooks/mergebot``).
        secret: the webhook's secret (WEBHOOK_SECRET); sent to the Hub only.
        namespace: where the bot publishes (MERGEBOT_NAMESPACE); default the token's user.
        watch: more (kind, name) pairs to watch, e.g. parents to re-merge when they change.

    Raises:
        bot.errors.HubError: the Hub refused (the token cannot write to the namespace, or manage webhooks).
    """
    bot = hub.whoami()
    home = namespace or bot
    requests_repo = f"{home}/requests"
    hub.ensure_repo(requests_repo)
    watched = (("user" if home == bot else "org", home), *(w for w in watch if w != ("user", home)))
    existing = hub.webhook_to(url)
    hook = existing if existing is not None else hub.create_webhook(url, watched, secret)
    return SetupReport(bot, requests_repo, hook, existing is None, tuple(watched))
