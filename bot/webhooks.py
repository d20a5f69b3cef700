"""The webhook boundary: secret check, the Hub's v3 payload -> a typed event, and its de-duplication key.

Pure functions; the HTTP route lives in :mod:`bot.app` and the handling in :mod:`bot.service`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bot.errors import BotError


class WebhookRejected(BotError):
    """A delivery that is refused; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def check_secret(received: str | None, expected: str) -> None:
    """Compare in constant time.

    Raises:
        WebhookRejected: 401 when no secret was sent, 403 when it is wrong.
    """
    if not received:
        raise WebhookRejected(401, "missing X-Webhook-Secret")
    if not hmac.compare_digest(received.encode(), expected.encode()):
        raise WebhookRejected(403, "wrong X-Webhook-Secret")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Event(_Loose):
    action: str
    scope: str


class _Repo(_Loose):
    type: str = "model"
    name: str
    headSha: str | None = None


class _Discussion(_Loose):
    id: str
    num: int
    isPullRequest: bool = False


class _Comment(_Loose):
    id: str
    hidden: bool = False


class _Payload(_Loose):
    event: _Event
    repo: _Repo
    discussion: _Discussion | None = None
    comment: _Comment | None = None


@dataclass(frozen=True)
class DiscussionEvent:
    """A new discussion (``comment_id`` None: its opening post) or a new comment."""

    repo_id: str
    num: int
    comment_id: str | None


@dataclass(frozen=True)
class RepoUpdate:
    """New commits on a repo's main branch."""

    repo_id: str
    head_sha: str | None


@dataclass(frozen=True)
class Ignored:
    why: str


Event = DiscussionEvent | RepoUpdate | Ignored


def parse_event(payload: Any) -> Event:
    """Read a v3 payload.

    Raises:
        WebhookRejected: 400 when the payload is not shaped like the Hub's.
    """
    try:
        p = _Payload.model_validate(payload)
    except ValidationError:
        raise WebhookRejected(400, "not a Hub webhook payload (v3)") from None
    if p.repo.type != "model":
        return Ignored(f"{p.repo.type} repos are not watched")
    scope, action = p.event.scope, p.event.action
    if scope == "discussion" and action == "create" and p.discussion and not p.discussion.isPullRequest:
        return DiscussionEvent(p.repo.name, p.discussion.num, None)
    if scope == "discussion.comment" and action == "create" and p.discussion and p.comment:
        if p.discussion.isPullRequest or p.comment.hidden:
            return Ignored("pull requests and hidden comments are not commands")
        return DiscussionEvent(p.repo.name, p.discussion.num, p.comment.id)
    if scope.startswith("repo.content") and action == "update":
        return RepoUpdate(p.repo.name, p.repo.headSha)
    return Ignored(f"{scope}/{action} is not handled")


def delivery_key(payload: Any) -> str:
    """What makes two deliveries the same event (the Hub retries): scope, action and the object's id."""
    p = _Payload.model_validate(payload)
    parts = [p.event.scope, p.event.action, p.repo.name]
    if p.comment is not None:
        parts.append(f"comment={p.comment.id}")
    elif p.discussion is not None:
        parts.append(f"discussion={p.discussion.id}")
    if p.repo.headSha and p.comment is None and p.discussion is None:
        parts.append(f"head={p.repo.headSha}")
    return "delivery:" + ":".join(parts)
