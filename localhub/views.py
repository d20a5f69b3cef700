"""The JSON shapes huggingface_hub parses, built from store values; no I/O, no rules."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from localhub.accounts import Account, Identity
from localhub.cards import base_model_relation, card_tags
from localhub.discussions import Discussion, Event
from localhub.gitobj import FileEntry
from localhub.repos import Commit, Repo


def jsonable(value: Any) -> Any:
    """YAML gives dates and other types JSON lacks; the Hub sends them as strings."""
    return json.loads(json.dumps(value, default=str))


def user_view(name: str, account_id: str) -> dict[str, Any]:
    return {
        "_id": account_id,
        "name": name,
        "fullname": name,
        "avatarUrl": f"/avatars/{name}.svg",
        "type": "user",
        "isPro": False,
        "isHf": False,
        "isMod": False,
        "isOwner": False,
        "isOrgMember": False,
    }


def whoami_view(identity: Identity, roles: Mapping[str, str]) -> dict[str, Any]:
    user = identity.user
    return {
        "type": "user",
        "id": user.id,
        "name": user.name,
        "fullname": user.fullname,
        "email": None,
        "emailVerified": False,
        "canPay": False,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": f"/avatars/{user.name}.svg",
        "orgs": [_org_view(org, roles.get(org.name, "admin")) for org in identity.orgs],
        "auth": {
            "type": "access_token",
            "accessToken": {"displayName": "localhub", "role": identity.role, "createdAt": user.created_at},
        },
    }


def _org_view(org: Account, role: str) -> dict[str, Any]:
    return {
        "type": "org",
        "id": org.id,
        "name": org.name,
        "fullname": org.fullname,
        "email": None,
        "canPay": False,
        "periodEnd": None,
        "avatarUrl": f"/avatars/{org.name}.svg",
        "roleInOrg": role,
        "isEnterprise": False,
    }


def file_view(entry: FileEntry, last_commit: Commit | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path}
    if entry.lfs:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    if last_commit is not None:
        data["lastCommit"] = last_commit_view(last_commit)
    return data


def folder_view(path: str, oid: str, last_commit: Commit | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
    if last_commit is not None:
        data["lastCommit"] = last_commit_view(last_commit)
    return data


def last_commit_view(commit: Commit) -> dict[str, Any]:
    return {"id": commit.oid, "title": commit.title, "date": commit.created_at}


def commit_view(commit: Commit) -> dict[str, Any]:
    return {
        "id": commit.oid,
        "title": commit.title,
        "message": commit.message,
        "authors": [{"user": commit.author, "avatar": f"/avatars/{commit.author}.svg"}],
        "date": commit.created_at,
    }


def sibling_view(entry: FileEntry, blobs: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"rfilename": entry.path}
    if blobs:
        data["size"] = entry.size
        data["blobId"] = entry.oid
        if entry.lfs:
            data["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return data


def repo_info_view(
    repo: Repo,
    commit: Commit,
    files: Mapping[str, FileEntry],
    card: dict[str, Any] | None,
    *,
    blobs: bool,
) -> dict[str, Any]:
    card = jsonable(card) if card is not None else None
    tags = card_tags(card) if card else []
    if any(p.endswith(".safetensors") for p in files):
        tags.append("safetensors")
    data: dict[str, Any] = {
        "_id": repo.id,
        "id": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.oid,
        "lastModified": commit.created_at,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": repo.gated or False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": list(dict.fromkeys(tags)),
        "siblings": [sibling_view(f, blobs) for f in files.values()],
        "usedStorage": sum(f.size for f in files.values()),
    }
    if card is not None:
        data["cardData"] = card
    if repo.type == "model" and card:
        if isinstance(card.get("library_name"), str):
            data["library_name"] = card["library_name"]
        if isinstance(card.get("pipeline_tag"), str):
            data["pipeline_tag"] = card["pipeline_tag"]
        relation = base_model_relation(card)
        if relation is not None:
            parents = card["base_model"] if isinstance(card["base_model"], list) else [card["base_model"]]
            data["baseModels"] = {"relation": relation, "models": [{"id": str(p)} for p in parents]}
    if repo.type == "space":
        data["sdk"] = repo.sdk
        data["subdomain"] = f"{repo.namespace}-{repo.name}".lower().replace("_", "-").replace(".", "-")
    return data


def event_view(event: Event, author_id: str) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "createdAt": event.created_at,
        "author": user_view(event.author, author_id),
        "data": event.data,
    }


def discussion_view(repo: Repo, discussion: Discussion, author_id: str, num_comments: int) -> dict[str, Any]:
    return {
        "num": discussion.num,
        "title": discussion.title,
        "status": discussion.status,
        "createdAt": discussion.created_at,
        "isPullRequest": discussion.is_pr,
        "pinned": False,
        "numComments": num_comments,
        "topReactions": [],
        "numReactionUsers": 0,
        "author": user_view(discussion.author, author_id),
        "repo": {"name": repo.repo_id, "type": repo.type},
    }


def comment_data(raw: str, author: str, author_id: str, now: str) -> dict[str, Any]:
    """A fresh comment's `data`, with one revision in its history."""
    revision = {"raw": raw, "html": _html(raw), "updatedAt": now, "author": user_view(author, author_id)}
    return {
        "edited": False,
        "hidden": False,
        "latest": revision,
        "history": [revision],
        "numEdits": 0,
        "editors": [author],
        "editReasons": [None],
        "reactions": [],
        "identifiedLanguage": {"language": "en", "probability": 1.0},
        "isReport": False,
    }


def _html(raw: str) -> str:
    return "".join(f"<p>{html.escape(p)}</p>" for p in raw.split("\n\n") if p) or "<p></p>"


def edited_comment_data(
    data: dict[str, Any], raw: str, editor: str, editor_id: str, now: str
) -> dict[str, Any]:
    revision = {"raw": raw, "html": _html(raw), "updatedAt": now, "author": user_view(editor, editor_id)}
    return {
        **data,
        "edited": True,
        "latest": revision,
        "history": [revision, *data["history"]],
        "numEdits": data["numEdits"] + 1,
        "editors": list(dict.fromkeys([*data["editors"], editor])),
        "editReasons": [None, *data.get("editReasons", [])],
    }


def hidden_comment_data(data: dict[str, Any], hider: str, hider_id: str, now: str) -> dict[str, Any]:
    raw = "This comment has been hidden"
    revision = {"raw": raw, "html": _html(raw), "updatedAt": now, "author": user_view(hider, hider_id)}
    return {**data, "hidden": True, "latest": revision, "history": [revision], "hiddenBy": hider}
