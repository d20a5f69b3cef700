"""The ONE module that talks to the Hub (through huggingface_hub). Built with an endpoint and a token.

Every HTTP failure becomes a :mod:`bot.errors` error built from fields (repo, status code),
never from response bodies or headers, so no token can leak into a message. Reading facts
(``repo_facts``, ``lineage``) happens here, before rendering, so cards do no network I/O.
"""

from __future__ import annotations

import logging
import os
import re
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
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from bot.errors import DestinationError, HubError, PreflightError
from bot.markdown import code_span
from bot.retry import RetryPolicy, with_retries
from bot.whoami import Account, WhoamiCache

log = logging.getLogger(__name__)
# the Hub refuses files this large outside LFS (hub-docs: "Files larger than 10MB must use Git LFS")
LFS_REQUIRED_BYTES = 10 * 1024 * 1024
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


_REVISION = re.compile(r"^[A-Za-z0-9][\w.\-/]{0,254}$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a repo id by huggingface_hub's rules (``name`` or ``org/name``); syntax only."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def is_revision(text: str) -> bool:
    """Whether ``text`` can name a revision: a branch, a tag, ``refs/pr/1`` or a commit; syntax only."""
    return bool(_REVISION.match(text)) and ".." not in text


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _as_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, str))
    return ()


def _repo_ids(value: Any) -> tuple[str, ...]:
    """A card's ``base_model`` entries that are repo ids; anything else a stranger wrote is dropped."""
    return tuple(v for v in _as_list(value) if is_repo_id(v))


class Hub:
    """The bot account's view of the Hub."""

    def __init__(
        self,
        endpoint: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        whoami_cache: WhoamiCache | None = None,
    ) -> None:
        """``retry``: how writes retry 429/5xx (see :mod:`bot.retry`); ``whoami_cache``: shared by ``as_user``."""
        self.endpoint = endpoint.rstrip("/")
        self._api = HfApi(endpoint=self.endpoint, token=token, library_name="mergebot")
        self._token = token
        self.retry = retry or RetryPolicy()
        self._whoami = whoami_cache or WhoamiCache()

    def __repr__(self) -> str:
        return f"Hub(endpoint={self.endpoint!r})"

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except HfHubHTTPError as exc:
            raise HubError(action, _status(exc)) from None

    def _write(self, action: str, fn: Callable[[], T], *, patient: bool = True) -> T:
        """A write, retried on 429 and 5xx (once only when not ``patient``)."""
        policy = self.retry if patient else self.retry.once()
        tries = [0]

        def counted() -> T:
            tries[0] += 1
            return fn()

        try:
            return with_retries(counted, policy, action)
        except HfHubHTTPError as exc:
            raise HubError(action, _status(exc), tries=tries[0]) from None

    # -- identity ---------------------------------------------------------------------

    def whoami(self) -> str:
        """The token's account name (asked of the Hub once per token and TTL, see :mod:`bot.whoami`)."""
        return self.account().name

    def account(self) -> Account:
        """The token's account: name and id (webhook payloads name authors by id only)."""

        def ask() -> Account:
            info = self._call("checking the token", lambda: self._api.whoami())
            return Account(str(info["name"]), str(info.get("id", "")))

        return self._whoami.get(self._token, ask)

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def as_user(self, token: str) -> Hub:
        """The same Hub seen with a signed-in user's token (to publish in the user's namespace)."""
        return Hub(self.endpoint, token, retry=self.retry, whoami_cache=self._whoami)

    # -- repo facts -------------------------------------------------------------------

    def repo_facts(self, repo_id: str, revision: str | None = None) -> RepoFacts:
        """Facts of a model repo at a revision (default: its main branch).

        Raises:
            PreflightError: the repo or revision does not exist, or the bot cannot read it.
        """
        shown = f"{repo_id}@{revision}" if revision else repo_id
        if not is_repo_id(repo_id):
            raise PreflightError(f"{code_span(repo_id)} is not a Hub repo id.")
        try:
            info = self._api.model_info(repo_id, revision=revision)
        except HFValidationError:  # a revision huggingface_hub refuses before asking
            raise PreflightError(f"{code_span(shown)} is not a Hub repo id and revision.") from None
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
        link = card.get("license_link") if isinstance(card.get("license_link"), str) else None
        if link and not link.startswith(("http://", "https://")):  # a file of that repo, e.g. LICENSE
            link = f"{self.endpoint}/{repo_id}/blob/{info.sha}/{link.lstrip('./')}"
        return RepoFacts(
            repo_id=repo_id,
            sha=str(info.sha),
            license=lic if isinstance(lic, str) else (lic[0] if isinstance(lic, list) and lic else None),
            license_name=card.get("license_name") if isinstance(card.get("license_name"), str) else None,
            license_link=link,
            gated=bool(info.gated),
            private=bool(info.private),
            base_models=_repo_ids(card.get("base_model")),
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
        except HFValidationError:
            raise PreflightError(f"{code_span(shown)} is not a Hub repo id.") from None
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

    def comment(self, repo_id: str, num: int, text: str, *, patient: bool = True) -> str:
        """Post a comment; returns its id. Not ``patient``: one try, no waiting on a rate limit."""
        made = self._write(
            f"commenting in `{repo_id}` #{num}",
            lambda: self._api.comment_discussion(repo_id, num, text),
            patient=patient,
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

    def edit_comment(
        self, repo_id: str, num: int, comment_id: str, text: str, *, patient: bool = True
    ) -> None:
        """Replace a comment's text. Not ``patient``: one try, no waiting on a rate limit."""
        self._write(
            f"editing a comment in `{repo_id}` #{num}",
            lambda: self._api.edit_discussion_comment(repo_id, num, comment_id, text),
            patient=patient,
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

        A repo this call creates is created private, and made public (unless ``private``) only
        once the block has committed: nobody sees it empty or half-uploaded. If the block fails
        before the commit, the repo is deleted again.
        """
        existed = self.repo_exists(repo_id)
        # a private repo with nothing committed in it is the shell an interrupted run created
        # (a restart runs the job again): it is this publication's to fill, show or delete
        shell = existed and self._empty_private(repo_id)
        if not existed:
            try:
                with_retries(
                    lambda: self._api.create_repo(repo_id, private=True, exist_ok=True),
                    self.retry,
                    f"creating `{repo_id}`",
                )
            except HfHubHTTPError as exc:
                if _status(exc) == 401:  # the token is not (or no longer) valid: not the name's fault
                    raise HubError(f"creating `{repo_id}`", 401) from None
                raise DestinationError(
                    f"The bot could not create `{repo_id}` (HTTP {_status(exc)})."
                ) from None
            if gated:
                self._write(
                    f"gating `{repo_id}`", lambda: self._api.update_repo_settings(repo_id, gated="auto")
                )
        pub = Publication(self._api, repo_id, self.retry)
        try:
            yield pub
            if (shell or not existed) and not private and pub.commit_oid is not None:
                self._write(
                    f"making `{repo_id}` public",
                    lambda: self._api.update_repo_settings(repo_id, private=False),
                )
        except BaseException:
            if (shell or not existed) and pub.commit_oid is None:
                try:
                    with_retries(
                        lambda: self._api.delete_repo(repo_id, missing_ok=True),
                        self.retry,
                        f"deleting `{repo_id}`",
                    )
                except HfHubHTTPError as exc:
                    log.warning("could not delete the empty repo %s (HTTP %s)", repo_id, _status(exc))
            raise

    def _empty_private(self, repo_id: str) -> bool:
        """Whether ``repo_id`` is private and holds no file but ``.gitattributes``."""
        info = self._call(f"reading `{repo_id}`", lambda: self._api.model_info(repo_id))
        if not info.private:
            return False
        files = self._call(f"listing `{repo_id}`", lambda: self._api.list_repo_files(repo_id))
        return set(files) <= {".gitattributes"}

    # -- deployment (`mergebot space push`, `mergebot bot setup`) -------------------------

    def ensure_repo(self, repo_id: str, *, repo_type: str = "model", space_sdk: str | None = None) -> None:
        """Create ``repo_id`` unless it exists (a Space needs its ``space_sdk``)."""
        self._call(
            f"creating `{repo_id}`",
            lambda: self._api.create_repo(repo_id, repo_type=repo_type, space_sdk=space_sdk, exist_ok=True),
        )

    def upload_space(self, repo_id: str, folder: Path, message: str) -> str:
        """Make the Space ``repo_id`` hold exactly ``folder`` (files it no longer has are deleted) in one commit.

        Returns:
            The commit's id.
        """
        info = self._call(
            f"uploading to the Space `{repo_id}`",
            lambda: self._api.upload_folder(
                repo_id=repo_id,
                repo_type="space",
                folder_path=folder,
                commit_message=message,
                delete_patterns="*",
            ),
        )
        return str(info.oid)

    def add_space_secret(self, repo_id: str, key: str, value: str) -> None:
        """Set the Space's secret ``key`` (write-only: the Hub never shows it again)."""
        self._call(
            f"setting the secret {key} of `{repo_id}`",
            lambda: self._api.add_space_secret(repo_id, key, value),
        )

    def add_space_variable(self, repo_id: str, key: str, value: str) -> None:
        """Set the Space's variable ``key`` (visible in its settings, unlike a secret)."""
        self._call(
            f"setting the variable {key} of `{repo_id}`",
            lambda: self._api.add_space_variable(repo_id, key, value),
        )

    def request_space_hardware(self, repo_id: str, flavor: str) -> None:
        """Ask for ``flavor`` (e.g. ``t4-small``) for the Space; paid hardware needs billing on the account."""
        self._call(
            f"requesting {flavor} for `{repo_id}`",
            lambda: self._api.request_space_hardware(repo_id, flavor),  # type: ignore[arg-type]
        )

    def create_webhook(self, url: str, watched: Sequence[tuple[str, str]], secret: str) -> str:
        """A webhook on the repo and discussion events of ``watched`` ((type, name) pairs) to ``url``.

        Returns:
            The webhook's id.
        """
        items: list[Any] = [{"type": kind, "name": name} for kind, name in watched]
        hook = self._call(
            "creating the webhook",
            lambda: self._api.create_webhook(
                url=url, watched=items, domains=["repo", "discussion"], secret=secret
            ),
        )
        return str(hook.id)

    def webhook_to(self, url: str) -> str | None:
        """The id of this account's webhook that posts to ``url``, if there is one."""
        hooks = self._call("listing the webhooks", lambda: self._api.list_webhooks())
        return next((str(h.id) for h in hooks if h.url == url), None)


class Publication:
    """Files staged for one atomic commit: large files are uploaded as they come, the commit lands last."""

    def __init__(self, api: HfApi, repo_id: str, retry: RetryPolicy | None = None) -> None:
        self._api = api
        self.repo_id = repo_id
        self._retry = retry or RetryPolicy()
        self._operations: list[CommitOperationAdd] = []
        self.commit_oid: str | None = None

    def upload_now(self, path_in_repo: str, local: Path) -> None:
        """Upload a large file now (LFS); delete the local copy once the Hub has it."""
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local))
        try:
            with_retries(
                lambda: self._api.preupload_lfs_files(self.repo_id, additions=[op]),
                self._retry,
                f"uploading `{path_in_repo}`",
            )
        except HfHubHTTPError as exc:
            raise HubError(f"uploading `{path_in_repo}`", _status(exc)) from None
        self._operations.append(op)
        if local.stat().st_size >= LFS_REQUIRED_BYTES:
            # the Hub stores a file this large in LFS, so the upload above was its whole content;
            # a smaller one may be sent inline by the commit and is kept until then
            os.remove(local)

    def add(self, path_in_repo: str, content: bytes | Path) -> None:
        """Stage a file for the final commit."""
        data = content if isinstance(content, bytes) else str(content)
        self._operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=data))

    @property
    def staged(self) -> tuple[str, ...]:
        return tuple(op.path_in_repo for op in self._operations)

    def commit(self, title: str, description: str) -> str:
        """Land every staged file in one commit, retried on 429 and 5xx; returns its id.

        A retry first looks for the commit: a 5xx may come after the commit landed.

        Raises:
            HubError: the Hub kept refusing, or refused the card's metadata.
        """
        tries = [0]

        def attempt() -> str:
            tries[0] += 1
            if tries[0] > 1:
                landed = next(
                    (c for c in self._api.list_repo_commits(self.repo_id) if c.title == title), None
                )
                if landed is not None:
                    return str(landed.commit_id)
            info = self._api.create_commit(
                self.repo_id, self._operations, commit_message=title, commit_description=description
            )
            return str(info.oid)

        action = f"committing to `{self.repo_id}`"
        try:
            self.commit_oid = with_retries(attempt, self._retry, action)
        except HfHubHTTPError as exc:
            raise HubError(action, _status(exc), tries=tries[0]) from None
        except ValueError:  # huggingface_hub asks the Hub's validate-yaml before committing a README
            raise HubError(f"{action}: the Hub refused the model card's metadata") from None
        return self.commit_oid
