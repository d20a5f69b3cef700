"""The ONE module that talks to the Hub (through huggingface_hub). Built with an endpoint and a token.

Every HTTP failure becomes a :mod:`bot.errors` error built from fields (repo, status code),
never from response bodies or headers, so no token can leak into a message. Reading facts
(``repo_facts``, ``lineage``) happens here, before rendering, so cards do no network I/O.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.community import DiscussionComment as HfDiscussionComment
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from bot.errors import DestinationError, HubError, PreflightError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RepoFacts:
    """What the card and the licence rules need to know about one repo at one commit."""

    repo_id: str
    sha: str
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    gated: bool = False
    private: bool = False
    base_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileFacts:
    """One file of a repo at a commit: its size (from metadata), and who may read the repo."""

    sha: str
    size: int | None
    private: bool = False
    gated: bool = False


@dataclass(frozen=True)
class LineageNode:
    repo_id: str
    license: str | None
    parents: tuple[str, ...]
    missing: bool = False  # the repo could not be read (deleted, private): shown, not followed


@dataclass(frozen=True)
class Lineage:
    """Ancestors of the merge's parents, gathered breadth-first up ``base_model`` card metadata."""

    roots: tuple[str, ...]
    nodes: tuple[LineageNode, ...] = field(default=())
    truncated: bool = False  # the depth limit stopped the walk


@dataclass(frozen=True)
class DiscussionComment:
    id: str
    author: str
    content: str


@dataclass(frozen=True)
class DiscussionInfo:
    repo_id: str
    num: int
    title: str
    author: str
    comments: tuple[DiscussionComment, ...]


@dataclass(frozen=True)
class CommitRef:
    oid: str
    title: str
    message: str


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _as_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, str))
    return ()


class Hub:
    """The bot account's view of the Hub."""

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._api = HfApi(endpoint=self.endpoint, token=token, library_name="mergebot")
        self._name: str | None = None

    def __repr__(self) -> str:
        return f"Hub(endpoint={self.endpoint!r})"

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except HfHubHTTPError as exc:
            raise HubError(action, _status(exc)) from None

    # -- identity ---------------------------------------------------------------------

    def whoami(self) -> str:
        """The bot account's name (asked once)."""
        if self._name is None:
            info = self._call("checking the bot's token", lambda: self._api.whoami())
            self._name = str(info["name"])
        return self._name

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def as_user(self, token: str) -> Hub:
        """The same Hub seen with a signed-in user's token (to publish in the user's namespace)."""
        return Hub(self.endpoint, token)

    # -- repo facts -------------------------------------------------------------------

    def repo_facts(self, repo_id: str, revision: str | None = None) -> RepoFacts:
        """Facts of a model repo at a revision (default: its main branch).

        Raises:
            PreflightError: the repo or revision does not exist, or the bot cannot read it.
        """
        shown = f"{repo_id}@{revision}" if revision else repo_id
        try:
            info = self._api.model_info(repo_id, revision=revision)
        except GatedRepoError:
            raise PreflightError(
                f"`{shown}` is gated and the bot has no access; grant it access first."
            ) from None
        except RevisionNotFoundError:
            raise PreflightError(f"`{repo_id}` has no revision `{revision}`.") from None
        except RepositoryNotFoundError:
            raise PreflightError(
                f"`{repo_id}` does not exist on the Hub, or the bot cannot see it."
            ) from None
        except HfHubHTTPError as exc:
            raise HubError(f"reading `{shown}`", _status(exc)) from None
        card = info.card_data.to_dict() if info.card_data is not None else {}
        lic = card.get("license")
        return RepoFacts(
            repo_id=repo_id,
            sha=str(info.sha),
            license=lic if isinstance(lic, str) else (lic[0] if isinstance(lic, list) and lic else None),
            license_name=card.get("license_name") if isinstance(card.get("license_name"), str) else None,
            license_link=card.get("license_link") if isinstance(card.get("license_link"), str) else None,
            gated=bool(info.gated),
            private=bool(info.private),
            base_models=_as_list(card.get("base_model")),
        )

    def head_sha(self, repo_id: str) -> str | None:
        """The main branch's commit, or None if the repo is gone or unreadable."""
        try:
            return str(self._api.model_info(repo_id).sha)
        except HfHubHTTPError:
            return None

    def repo_exists(self, repo_id: str) -> bool:
        return self._call(f"looking up `{repo_id}`", lambda: self._api.repo_exists(repo_id))

    def file_facts(self, repo_id: str, path: str, *, repo_type: str, revision: str | None) -> FileFacts:
        """The commit of ``repo_id`` at ``revision``, and the size of ``path`` there, from file metadata (no download).

        Raises:
            PreflightError: the repo, the revision or the file does not exist (or the bot cannot read it).
        """
        shown = f"{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        try:
            info = self._api.repo_info(repo_id, repo_type=repo_type, revision=revision)
            listed = self._api.get_paths_info(repo_id, [path], repo_type=repo_type, revision=info.sha)
        except GatedRepoError:
            raise PreflightError(
                f"`{shown}` is gated and the bot has no access; grant it access first."
            ) from None
        except RevisionNotFoundError:
            raise PreflightError(f"`{shown}` has no revision `{revision}`.") from None
        except RepositoryNotFoundError:
            raise PreflightError(f"`{shown}` does not exist on the Hub, or the bot cannot see it.") from None
        except HfHubHTTPError as exc:
            raise HubError(f"reading `{shown}`", _status(exc)) from None
        entry = next((e for e in listed if e.path == path), None)
        if not isinstance(entry, RepoFile):
            raise PreflightError(f"`{shown}` has no file `{path}`.")
        return FileFacts(
            sha=str(info.sha),
            size=entry.size,
            private=bool(info.private),
            gated=bool(getattr(info, "gated", False)),
        )

    def has_file(self, repo_id: str, path: str, *, revision: str | None = None) -> bool:
        """Whether a model repo holds ``path`` at ``revision``."""
        return self._call(
            f"looking for `{path}` in `{repo_id}`",
            lambda: self._api.file_exists(repo_id, path, revision=revision),
        )

    def download_model(self, repo_id: str, revision: str, folder: Path) -> Path:
        """Weights (safetensors only: never pickles, never code), config and tokenizer files into ``folder``."""
        self._call(
            f"downloading `{repo_id}`",
            lambda: self._api.snapshot_download(
                repo_id,
                revision=revision,
                local_dir=folder,
                allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"],
            ),
        )
        return folder

    def download_file(self, repo_id: str, path: str, *, repo_type: str, revision: str, folder: Path) -> Path:
        """One file of a repo into ``folder``; returns its local path."""
        local = self._call(
            f"downloading `{path}` from `{repo_id}`",
            lambda: self._api.hf_hub_download(
                repo_id, path, repo_type=repo_type, revision=revision, local_dir=folder
            ),
        )
        return Path(local)

    def lineage(self, roots: Sequence[str], depth: int) -> Lineage:
        """Walk ``base_model`` metadata up from ``roots`` for ``depth`` generations (cycles and gaps are safe).

        A private repo is shown as missing (not followed), whoever can read it.
        """
        nodes: dict[str, LineageNode] = {}
        queue: deque[tuple[str, int]] = deque((r, 0) for r in dict.fromkeys(roots))
        truncated = False
        while queue:
            repo_id, level = queue.popleft()
            if repo_id in nodes:
                continue
            if level > depth:
                truncated = True
                continue
            try:
                facts = self.repo_facts(repo_id)
            except (PreflightError, HubError):
                nodes[repo_id] = LineageNode(repo_id, None, (), missing=True)
                continue
            if facts.private:  # what the bot's token sees of a private repo is not the card's to tell
                nodes[repo_id] = LineageNode(repo_id, None, (), missing=True)
                continue
            nodes[repo_id] = LineageNode(repo_id, facts.license, facts.base_models)
            queue.extend((p, level + 1) for p in facts.base_models if p not in nodes)
        return Lineage(tuple(dict.fromkeys(roots)), tuple(nodes.values()), truncated)

    # -- discussions ------------------------------------------------------------------

    def discussion(self, repo_id: str, num: int) -> DiscussionInfo:
        """A discussion with its comments (payloads carry ids only; this gives names)."""
        details = self._call(
            f"reading discussion #{num} of `{repo_id}`",
            lambda: self._api.get_discussion_details(repo_id, num),
        )
        comments = tuple(
            DiscussionComment(e.id, e.author, e.content)
            for e in details.events
            if isinstance(e, HfDiscussionComment) and not e.hidden
        )
        return DiscussionInfo(repo_id, num, details.title, details.author, comments)

    def comment(self, repo_id: str, num: int, text: str) -> str:
        """Post a comment; returns its id."""
        made = self._call(
            f"commenting in `{repo_id}` #{num}", lambda: self._api.comment_discussion(repo_id, num, text)
        )
        return str(made.id)

    def open_discussions(self, repo_id: str) -> list[int]:
        """Numbers of the open discussions (not pull requests) of a repo; empty if it does not exist."""
        try:
            found = self._api.get_repo_discussions(
                repo_id, discussion_type="discussion", discussion_status="open"
            )
            return [d.num for d in found]
        except RepositoryNotFoundError:
            return []
        except HfHubHTTPError as exc:
            raise HubError(f"listing the discussions of `{repo_id}`", _status(exc)) from None

    def edit_comment(self, repo_id: str, num: int, comment_id: str, text: str) -> None:
        self._call(
            f"editing a comment in `{repo_id}` #{num}",
            lambda: self._api.edit_discussion_comment(repo_id, num, comment_id, text),
        )

    # -- publishing -------------------------------------------------------------------

    def commit_with_marker(self, repo_id: str, marker: str) -> CommitRef | None:
        """The newest commit of ``repo_id`` whose message holds ``marker`` (None if none or no repo)."""
        try:
            commits = self._api.list_repo_commits(repo_id)
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            raise HubError(f"listing the commits of `{repo_id}`", _status(exc)) from None
        for c in commits:
            if marker in (c.title or "") or marker in (c.message or ""):
                return CommitRef(c.commit_id, c.title, c.message)
        return None

    @contextmanager
    def publication(self, repo_id: str, *, private: bool, gated: bool) -> Iterator[Publication]:
        """Create (or reuse) ``repo_id`` and stage files into it; nothing is visible until ``commit``.

        If the block fails before the commit, a repo this call created is deleted again.
        """
        existed = self.repo_exists(repo_id)
        if not existed:
            try:
                self._api.create_repo(repo_id, private=private, exist_ok=True)
            except HfHubHTTPError as exc:
                if _status(exc) == 401:  # the token is not (or no longer) valid: not the name's fault
                    raise HubError(f"creating `{repo_id}`", 401) from None
                raise DestinationError(
                    f"The bot could not create `{repo_id}` (HTTP {_status(exc)})."
                ) from None
            if gated:
                self._call(
                    f"gating `{repo_id}`", lambda: self._api.update_repo_settings(repo_id, gated="auto")
                )
        pub = Publication(self._api, repo_id)
        try:
            yield pub
        except BaseException:
            if not existed and pub.commit_oid is None:
                try:
                    self._api.delete_repo(repo_id, missing_ok=True)
                except HfHubHTTPError as exc:
                    log.warning("could not delete the empty repo %s (HTTP %s)", repo_id, _status(exc))
            raise


class Publication:
    """Files staged for one atomic commit: large files are uploaded as they come, the commit lands last."""

    def __init__(self, api: HfApi, repo_id: str) -> None:
        self._api = api
        self.repo_id = repo_id
        self._operations: list[CommitOperationAdd] = []
        self.commit_oid: str | None = None

    def upload_now(self, path_in_repo: str, local: Path) -> None:
        """Upload a large file now (LFS); delete the local copy once the Hub has it."""
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local))
        try:
            self._api.preupload_lfs_files(self.repo_id, additions=[op])
        except HfHubHTTPError as exc:
            raise HubError(f"uploading `{path_in_repo}`", _status(exc)) from None
        self._operations.append(op)
        if op._upload_mode == "lfs":  # a regular file is sent inline by the commit: keep it until then
            os.remove(local)

    def add(self, path_in_repo: str, content: bytes | Path) -> None:
        """Stage a file for the final commit."""
        data = content if isinstance(content, bytes) else str(content)
        self._operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=data))

    @property
    def staged(self) -> tuple[str, ...]:
        return tuple(op.path_in_repo for op in self._operations)

    def commit(self, title: str, description: str) -> str:
        """Land every staged file in one commit; returns its id."""
        try:
            info = self._api.create_commit(
                self.repo_id, self._operations, commit_message=title, commit_description=description
            )
        except HfHubHTTPError as exc:
            raise HubError(f"committing to `{self.repo_id}`", _status(exc)) from None
        self.commit_oid = str(info.oid)
        return self.commit_oid
