"""What every handler of the page needs: who is signed in, and the one table of error messages."""

from __future__ import annotations

import logging

import gradio as gr
from pydantic import SecretStr

from bot.credentials import UserCredential
from bot.errors import BotError
from engine import MergeError, RecipeError

log = logging.getLogger(__name__)


def error_message(exc: Exception) -> str:
    """The one table that turns errors into messages on the page."""
    if isinstance(exc, RecipeError):
        return f"The recipe is not valid:\n```\n{exc}\n```"
    if isinstance(exc, MergeError | BotError):
        return str(exc)
    log.exception("unexpected error in the Space", exc_info=exc)
    return "Something went wrong on our side; the operator has the details."


def signed_in(profile: gr.OAuthProfile | None, token: gr.OAuthToken | None) -> UserCredential | None:
    """Gradio's OAuth values -> the bot's in-memory credential (None when nobody signed in)."""
    if profile is None or token is None or not token.token:
        return None
    return UserCredential(str(profile.username), SecretStr(token.token))


def user_name(profile: gr.OAuthProfile | None) -> str | None:
    return str(profile.username) if profile is not None else None
