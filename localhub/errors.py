"""The one exception tree of localhub; the HTTP layer maps it to responses in one table.

    LocalHubError                      status  X-Error-Code
    ├── BadRequest                       400
    │   └── InvalidPath                  400
    ├── Unauthorized                     401
    ├── Forbidden                        403
    │   └── GatedRepo                    403   GatedRepo
    ├── NotFound                         404
    │   ├── RepoNotFound                 404   RepoNotFound
    │   ├── RevisionNotFound             404   RevisionNotFound
    │   ├── EntryNotFound                404   EntryNotFound
    │   └── DiscussionNotFound           404
    ├── Conflict                         409   (carries the conflicting resource's url when known)
    ├── PreconditionFailed               412
    ├── PayloadTooLarge                  413
    └── TooManyRequests                  429   (Retry-After, RateLimit and RateLimit-Policy headers)

Each error's message is written for the person on the client side: huggingface_hub
shows it (from the ``X-Error-Message`` header and the JSON ``error`` field) inside
the exception it raises.
"""

from __future__ import annotations

from typing import ClassVar


class LocalHubError(Exception):
    """Base of every error a client can cause; never a bug."""

    status_code: ClassVar[int] = 400
    error_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        # Extra response headers (e.g. X-Repo-Commit on a missing file, which the client caches).
        self.headers: dict[str, str] = {}


class BadRequest(LocalHubError):
    status_code = 400


class InvalidPath(BadRequest):
    """A file path that could escape the repo (``..``, absolute) or holds a NUL byte."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"Invalid path {path!r}: paths must be relative, without '..' segments or NUL bytes."
        )
        self.path = path


class Unauthorized(LocalHubError):
    status_code = 401


class Forbidden(LocalHubError):
    status_code = 403


class GatedRepo(Forbidden):
    error_code = "GatedRepo"


class NotFound(LocalHubError):
    status_code = 404


class RepoNotFound(NotFound):
    error_code = "RepoNotFound"

    def __init__(self, repo_id: str) -> None:
        super().__init__(f"Repository Not Found: {repo_id}")
        self.repo_id = repo_id


class RevisionNotFound(NotFound):
    error_code = "RevisionNotFound"

    def __init__(self, repo_id: str, revision: str) -> None:
        super().__init__(f"Invalid rev id: {revision} (repo {repo_id})")
        self.repo_id = repo_id
        self.revision = revision


class EntryNotFound(NotFound):
    error_code = "EntryNotFound"

    def __init__(self, repo_id: str, path: str) -> None:
        super().__init__(f"Entry not found: {path} (repo {repo_id})")
        self.repo_id = repo_id
        self.path = path


class DiscussionNotFound(NotFound):
    def __init__(self, repo_id: str, num: int) -> None:
        super().__init__(f"Discussion #{num} not found in {repo_id}")


class Conflict(LocalHubError):
    status_code = 409


class PreconditionFailed(LocalHubError):
    status_code = 412


class PayloadTooLarge(LocalHubError):
    status_code = 413


class TooManyRequests(LocalHubError):
    """A rate limit is reached; the headers say when to come back, as the Hub's do."""

    status_code = 429

    def __init__(self, action: str, *, retry_after: int, limit: int, window_seconds: int) -> None:
        super().__init__(f"You have been rate-limited ({action}); retry in {retry_after} seconds.")
        self.headers.update(
            {
                "Retry-After": str(retry_after),
                "RateLimit": f'"api";r=0;t={retry_after}',
                "RateLimit-Policy": f'"fixed window";"api";q={limit};w={window_seconds}',
            }
        )
