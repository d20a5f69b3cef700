"""The webhook boundary: secret check, bounded body -> JSON, the Hub's v3 payload -> a typed event,
and its de-duplication key.

The Hub never redelivers a failed delivery on its own (only a manual replay does), and each
webhook gets 1,000 deliveries a day; what a delivery misses, the bot's poll catches up on.
Every comment edit or hide is a delivery too (``discussion.comment`` / ``update``): those, and
the bot's own comments, are recognised from the payload alone, with no Hub call.

Pure functions; the HTTP route lives in :mod:`bot.app` and the handling in :mod:`bot.service`.
A body is at most :data:`MAX_BODY_BYTES` and its JSON at most :data:`MAX_DEPTH` levels deep (the
Hub's payloads are five); only the fields the bot reads are kept (:func:`compact`).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bot.errors import BotError


class WebhookRejected(BotError):
    """A delivery that is refused; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32


def check_secret(received: str | None, expected: str) -> None:
    """Compare in constant time.

    Raises:
        WebhookRejected: 401 when no secret was sent, 403 when it is wrong.
    """
    if not received:
        raise WebhookRejected(401, "missing X-Webhook-Secret")
    if not hmac.compare_digest(received.encode(), expected.encode()):
        raise WebhookRejected(403, "wrong X-Webhook-Secret")


def is_operator(authorization: str | None, secret: str) -> bool:
    """Whether an ``Authorization: Bearer <secret>`` header holds the operator's secret (constant time)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), secret.encode())


def check_length(content_length: str | None) -> None:
    """Refuse a body whose declared length is above the limit, before reading it.

    Raises:
        WebhookRejected: 413 when it is; 400 when the header is not a length.
    """
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise WebhookRejected(400, "Content-Length is not a number") from None
    if length > MAX_BODY_BYTES:
        raise WebhookRejected(413, f"the body is larger than {MAX_BODY_BYTES} bytes")


def load_json(body: bytes) -> Any:
    """The body's JSON, refused when malformed or nested deeper than :data:`MAX_DEPTH`.

    Raises:
        WebhookRejected: 413 when the body is too large, 400 when it is not JSON or too deep.
    """
    if len(body) > MAX_BODY_BYTES:
        raise WebhookRejected(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # the decoder recurses once per level
        raise WebhookRejected(400, "the body is not JSON") from None
    level: list[tuple[Any, int]] = [(value, 1)]
    while level:  # breadth-first, without recursion
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    raise WebhookRejected(400, f"the JSON is nested deeper than {MAX_DEPTH} levels")
                level.append((child, depth + 1))
    return value


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


class _Author(_Loose):
    id: str | None = None


class _Comment(_Loose):
    id: str
    hidden: bool = False
    author: _Author | None = None


class _Ref(_Loose):
    ref: str


class _Payload(_Loose):
    event: _Event
    repo: _Repo
    discussion: _Discussion | None = None
    comment: _Comment | None = None
    updatedRefs: list[_Ref] | None = None


@dataclass(frozen=True)
class DiscussionEvent:
    """A new discussion (``comment_id`` None: its opening post) or a new comment."""

    repo_id: str
    num: int
    comment_id: str | None


@dataclass(frozen=True)
class RepoUpdate:
    """New commits on a repo's main branch (``head_sha``: main's head, as the Hub sends it)."""

    repo_id: str
    head_sha: str | None


@dataclass(frozen=True)
class Ignored:
    why: str


Event = DiscussionEvent | RepoUpdate | Ignored


def parse_event(payload: Any, *, own_id: str | None = None) -> Event:
    """Read a v3 payload; ``own_id``: the bot account's id, whose comments are never commands.

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
    author = p.comment.author.id if p.comment and p.comment.author else None
    if scope == "discussion.comment" and own_id and author == own_id:
        return Ignored("the bot's own comment")
    if scope == "discussion.comment" and action == "create" and p.discussion and p.comment:
        if p.discussion.isPullRequest or p.comment.hidden:
            return Ignored("pull requests and hidden comments are not commands")
        return DiscussionEvent(p.repo.name, p.discussion.num, p.comment.id)
    if scope.startswith("repo.content") and action == "update":
        if p.updatedRefs is not None and not any(r.ref == "refs/heads/main" for r in p.updatedRefs):
            return Ignored("main did not move (a PR or another branch did)")
        return RepoUpdate(p.repo.name, p.repo.headSha)
    return Ignored(f"{scope}/{action} is not handled")


def compact(payload: Any) -> dict[str, Any]:
    """Only the fields of a payload that the bot reads (what is recorded, not the whole body).

    Raises:
        WebhookRejected: 400 when the payload is not shaped like the Hub's.
    """
    try:
        return _Payload.model_validate(payload).model_dump(exclude_none=True)
    except ValidationError:
        raise WebhookRejected(400, "not a Hub webhook payload (v3)") from None


def delivery_key(payload: Any) -> str:
    """What makes two deliveries the same event (a manual replay, or the poll seeing it first)."""
    p = _Payload.model_validate(payload)
    parts = [p.event.scope, p.event.action, p.repo.name]
    if p.comment is not None:
        parts.append(f"comment={p.comment.id}")
    elif p.discussion is not None:
        parts.append(f"discussion={p.discussion.id}")
    if p.repo.headSha and p.comment is None and p.discussion is None:
        parts.append(f"head={p.repo.headSha}")
    return "delivery:" + ":".join(parts)
