"""The HTTP face of a `LocalHub`: the Hub's routes, as huggingface_hub calls them.

Repo-scoped routes are parsed from the raw request path, because the client quotes
revisions and paths (``refs%2Fpr%2F1``) and the decoded path would be ambiguous.
Errors become responses in one place (`_error_response`), with the ``X-Error-Code`` and
``X-Error-Message`` headers the client turns into typed exceptions.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlencode

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

from localhub.accounts import Identity
from localhub.cards import metadata_problems, parse_card
from localhub.commit_service import CommitService, parse_ndjson
from localhub.config import RateLimitedAction
from localhub.discussion_service import DiscussionService
from localhub.errors import BadRequest, EntryNotFound, LocalHubError, NotFound, PayloadTooLarge, Unauthorized
from localhub.gitobj import validate_path
from localhub.hub import LocalHub
from localhub.lfs import UploadGrant
from localhub.pages import repo_page
from localhub.repo_service import RepoKey, RepoService
from localhub.repos import RepoType
from localhub.views import whoami_view
from localhub.webhooks import WatchedItem, Webhook

PLURALS: dict[str, RepoType] = {"models": "model", "datasets": "dataset", "spaces": "space"}
JSON_LIMIT = 16 * 1024 * 1024

Handler = Callable[[], Awaitable[Response]]


class CreateRepoBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    organization: str | None = None
    type: RepoType = "model"
    visibility: Literal["public", "private", "protected"] | None = None
    private: bool | None = None
    sdk: str | None = None


class DeleteRepoBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    organization: str | None = None
    type: RepoType = "model"


class SettingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    gated: Literal["auto", "manual", False] | None = None
    visibility: Literal["public", "private", "protected"] | None = None
    private: bool | None = None


class WebhookBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str | None = None
    watched: list[WatchedItem] | None = None
    domains: list[Literal["repo", "discussion"]] | None = None
    secret: str | None = None


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _header_safe(text: str) -> str:
    return (
        text.replace("\r", " ")
        .replace("\n", " ")
        .encode("latin-1", errors="replace")
        .decode("latin-1")[:2000]
    )


def _error_response(exc: LocalHubError) -> JSONResponse:
    headers = {"X-Error-Message": _header_safe(exc.message), **exc.headers}
    if exc.error_code:
        headers["X-Error-Code"] = exc.error_code
    body: dict[str, Any] = {"error": exc.message}
    if exc.url:
        body["url"] = exc.url
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _webhook_view(webhook: Webhook) -> dict[str, Any]:
    return {
        "id": webhook.id,
        "url": webhook.url,
        "watched": [{"type": w.type, "name": w.name} for w in webhook.watched],
        "domains": list(webhook.domains),
        "secret": webhook.secret,
        "disabled": webhook.disabled,
    }


async def _json(request: Request) -> Any:
    body = await _read_body(request, JSON_LIMIT)
    if not body:
        return {}
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes is larger than the limit of {limit} bytes.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _model(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc.errors(include_url=False)}") from None


class HubApp:
    """Routes of one hub; `create_app` wires them into a FastAPI application."""

    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub
        self.repos = RepoService(hub)
        self.commits = CommitService(hub)
        self.discussions = DiscussionService(hub)

    # helpers

    async def identity(self, request: Request) -> Identity | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return await run_in_threadpool(self.hub.identify, token)

    @staticmethod
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # fixed routes

    def _limit(self, action: RateLimitedAction, identity: Identity | None) -> None:
        """Count one rate-limited request (TooManyRequests when over the limit)."""
        self.hub.limits.check(action, identity.user.name if identity else "anonymous")

    def _limited(self, action: RateLimitedAction, request: Request, handler: Handler) -> Handler:
        async def run() -> Response:
            self._limit(action, await self.identity(request))
            return await handler()

        return run

    async def whoami(self, request: Request) -> Response:
        identity = await self.identity(request)
        if identity is None:
            raise Unauthorized("Invalid username or password.")
        self._limit("whoami", identity)

        def roles() -> dict[str, str]:
            with self.hub.db.read() as conn:
                return {
                    org.name: self.hub.accounts.role_in_org(conn, org.name, identity.user.name) or "admin"
                    for org in identity.orgs
                }

        return JSONResponse(whoami_view(identity, await run_in_threadpool(roles)))

    async def create_repo(self, request: Request) -> Response:
        body: CreateRepoBody = _model(CreateRepoBody, await _json(request))
        private = body.visibility == "private" if body.visibility is not None else bool(body.private)
        result = await run_in_threadpool(
            self.repos.create,
            await self.identity(request),
            body.type,
            body.name,
            body.organization,
            private,
            body.sdk,
            self.base_url(request),
        )
        return JSONResponse(result)

    async def delete_repo(self, request: Request) -> Response:
        body: DeleteRepoBody = _model(DeleteRepoBody, await _json(request))
        identity = await self.identity(request)
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to delete a repository.")
        key = RepoKey(body.type, body.organization or identity.user.name, body.name)
        await run_in_threadpool(self.repos.delete, identity, key, self.base_url(request))
        return Response(status_code=200)

    async def validate_yaml(self, request: Request) -> Response:
        """The Hub's metadata check, one error per problem (huggingface_hub runs it before a commit)."""
        body = await _json(request)
        content = body.get("content", "") if isinstance(body, dict) else ""
        try:
            card = parse_card(str(content))
        except BadRequest as exc:
            return JSONResponse({"errors": [{"message": exc.message}], "warnings": []}, status_code=400)
        problems = metadata_problems(card) if card else []
        if problems:
            return JSONResponse(
                {"errors": [{"message": p} for p in problems], "warnings": []}, status_code=400
            )
        return JSONResponse({"errors": [], "warnings": []})

    async def webhooks(self, request: Request) -> Response:
        identity = await self.identity(request)
        if identity is None:
            raise Unauthorized("You must be authenticated to manage webhooks.")
        if request.method == "GET":

            def listed() -> list[Webhook]:
                with self.hub.db.read() as conn:
                    return self.hub.webhooks.all(conn, owner=identity.user.name)

            return JSONResponse([_webhook_view(w) for w in await run_in_threadpool(listed)])
        body: WebhookBody = _model(WebhookBody, await _json(request))
        if body.url is None or body.watched is None:
            raise BadRequest("A webhook needs a url and a list of watched items.")
        webhook = await run_in_threadpool(
            self.hub.add_webhook,
            body.url,
            body.watched,
            body.secret,
            body.domains or ["repo", "discussion"],
            identity.user.name,
        )
        return JSONResponse({"webhook": _webhook_view(webhook)})

    async def webhook(self, request: Request) -> Response:
        identity = await self.identity(request)
        if identity is None:
            raise Unauthorized("You must be authenticated to manage webhooks.")
        webhook_id = request.path_params["webhook_id"]
        action = request.path_params.get("action")
        body: WebhookBody | None = None
        if request.method == "POST" and action is None:
            body = _model(WebhookBody, await _json(request))

        def run() -> Webhook | None:
            with self.hub.db.write() as conn:
                webhook = self.hub.webhooks.get(conn, webhook_id)
                if webhook is None or webhook.owner != identity.user.name:
                    raise NotFound(f"Webhook {webhook_id} not found.")
                if request.method == "DELETE":
                    self.hub.webhooks.delete(conn, webhook)
                    return None
                if action in ("enable", "disable"):
                    return self.hub.webhooks.update(conn, webhook, disabled=action == "disable")
                if body is not None:
                    return self.hub.webhooks.update(
                        conn,
                        webhook,
                        url=body.url,
                        secret=body.secret,
                        watched=body.watched,
                        domains=body.domains,
                    )
                return webhook

        webhook = await run_in_threadpool(run)
        return JSONResponse({"webhook": _webhook_view(webhook)} if webhook else {})

    # everything under a repo

    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        handler = self._route(request, segments, raw_path)
        if handler is None:
            raise NotFound(f"Not found: {request.method} {request.url.path}")
        return await handler()

    def _route(self, request: Request, seg: list[str], raw_path: str) -> Handler | None:
        method = request.method
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in PLURALS:
            key = RepoKey(PLURALS[seg[1]], seg[2], seg[3])
            return self._api_route(request, method, key, seg[4:], raw_path)
        if len(seg) >= 3 and seg[0] == "localhub-lfs" and seg[1].isdigit():
            return self._upload_route(request, method, seg[1:])
        repo_type: RepoType = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = PLURALS[seg[0]], seg[1:]
        if len(seg) == 2 and method == "GET" and seg[0] not in ("api", "localhub-lfs"):
            key = RepoKey(repo_type, seg[0], seg[1])
            return lambda: self._page(request, key)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            key = RepoKey(repo_type, seg[0], seg[1])
            return lambda: self.download(request, key, seg[3], "/".join(seg[4:]))
        if (
            len(seg) == 6
            and seg[1].endswith(".git")
            and seg[2:5] == ["info", "lfs", "objects"]
            and method == "POST"
        ):
            key = RepoKey(repo_type, seg[0], seg[1][: -len(".git")])
            if seg[5] == "batch":
                return lambda: self._lfs_batch(request, key)
            if seg[5] == "verify":
                return lambda: self._lfs_verify(request, key)
        return None

    def _api_route(
        self, request: Request, method: str, key: RepoKey, rest: list[str], raw_path: str
    ) -> Handler | None:
        q = request.query_params
        n = len(rest)
        head = rest[0] if rest else ""
        if n == 0 and method == "GET":
            return lambda: self._info(request, key, "main", _flag(q.get("blobs")))
        if head == "revision" and n == 2 and method == "GET":
            return lambda: self._info(request, key, rest[1], _flag(q.get("blobs")))
        if head == "tree" and n >= 2 and method == "GET":
            return lambda: self._tree(request, key, rest[1], "/".join(rest[2:]), raw_path)
        if head == "paths-info" and n == 2 and method == "POST":
            return lambda: self._paths_info(request, key, rest[1])
        if head == "refs" and n == 1 and method == "GET":
            return lambda: self._call(self.repos.refs, request, key, _flag(q.get("include_prs")))
        if head == "commits" and n == 2 and method == "GET":
            return lambda: self._commits(request, key, rest[1], raw_path)
        if head == "preupload" and n == 2 and method == "POST":
            return lambda: self._with_json(request, self.commits.preupload, key, rest[1])
        if head == "commit" and n == 2 and method == "POST":
            return lambda: self._commit(request, key, rest[1], _flag(q.get("create_pr")))
        if head in ("branch", "tag") and n == 2 and method in ("POST", "DELETE"):
            return lambda: self._ref(request, key, head, rest[1])  # type: ignore[arg-type]
        if head == "settings" and n == 1 and method == "PUT":
            return lambda: self._settings(request, key)
        if head == "discussions":
            return self._discussion_route(request, method, key, rest[1:])
        if (
            key.type == "space"
            and head in ("secrets", "variables", "hardware")
            and n == 1
            and method == "POST"
        ):
            return lambda: self._space_runtime(request, key, head)
        return None

    def _discussion_route(
        self, request: Request, method: str, key: RepoKey, rest: list[str]
    ) -> Handler | None:
        q = request.query_params
        base = self.base_url(request)
        if not rest:
            if method == "GET":
                page = int(q.get("p", "0")) if q.get("p", "0").isdigit() else 0
                return lambda: self._call(
                    self.discussions.list, request, key, page, q.get("type"), q.get("status"), q.get("author")
                )
            if method == "POST":

                async def create() -> Response:
                    body = await _json(request)
                    return await self._call(
                        self.discussions.create,
                        request,
                        key,
                        str(body.get("title", "")),
                        str(body.get("description") or ""),
                        bool(body.get("pullRequest", False)),
                        base,
                    )

                return create
            return None
        if not rest[0].isdigit():
            return None
        num = int(rest[0])
        if len(rest) == 1 and method == "GET":
            return lambda: self._call(self.discussions.details, request, key, num)
        if method != "POST":
            return None

        async def post(
            fn: Callable[[dict[str, Any]], tuple[Any, ...]], service: Callable[..., dict[str, Any]]
        ) -> Response:
            body = await _json(request)
            return await self._call(service, request, key, num, *fn(body if isinstance(body, dict) else {}))

        if rest[1:] == ["comment"]:
            return self._limited(
                "comment",
                request,
                lambda: post(lambda b: (str(b.get("comment", "")), base), self.discussions.comment),
            )
        if rest[1:] == ["title"]:
            return lambda: post(lambda b: (str(b.get("title", "")), base), self.discussions.rename)
        if rest[1:] == ["status"]:
            return lambda: post(
                lambda b: (str(b.get("status", "")), b.get("comment"), base), self.discussions.change_status
            )
        if rest[1:] == ["merge"]:
            return lambda: post(lambda b: (b.get("comment"), base), self.discussions.merge)
        if len(rest) == 4 and rest[1] == "comment" and rest[3] == "edit":
            return self._limited(
                "edit",
                request,
                lambda: post(
                    lambda b: (rest[2], str(b.get("content", "")), base), self.discussions.edit_comment
                ),
            )
        if len(rest) == 4 and rest[1] == "comment" and rest[3] == "hide":
            return lambda: post(lambda b: (rest[2], base), self.discussions.hide_comment)
        return None

    async def _call(self, fn: Callable[..., Any], request: Request, *args: Any) -> Response:
        result = await run_in_threadpool(fn, await self.identity(request), *args)
        return JSONResponse(result)

    async def _with_json(self, request: Request, fn: Callable[..., Any], *args: Any) -> Response:
        body = await _json(request)
        return await self._call(fn, request, *args, body)

    async def _page(self, request: Request, key: RepoKey) -> Response:
        identity = await self.identity(request)
        info = await run_in_threadpool(self.repos.info, identity, key, "main", True)
        readme = await run_in_threadpool(self.repos.readme, identity, key, "main")
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[key.type]
        html = repo_page(self.base_url(request), f"{prefix}{key.namespace}/{key.name}", info, readme)
        return HTMLResponse(html)

    async def _info(self, request: Request, key: RepoKey, revision: str, blobs: bool) -> Response:
        return await self._call(self.repos.info, request, key, revision, blobs)

    def _paged(
        self, request: Request, items: list[Any], page_size: int, raw_path: str, param: str
    ) -> Response:
        q = request.query_params
        start = int(q[param]) if q.get(param, "").isdigit() else 0
        if param == "p":
            start *= page_size
        page = items[start : start + page_size]
        headers = {}
        if start + page_size < len(items):
            params = {k: v for k, v in q.items() if k != param}
            params[param] = str(start + page_size if param == "cursor" else start // page_size + 1)
            headers["Link"] = f'<{self.base_url(request)}{raw_path}?{urlencode(params)}>; rel="next"'
        return JSONResponse(page, headers=headers)

    async def _tree(
        self, request: Request, key: RepoKey, revision: str, path: str, raw_path: str
    ) -> Response:
        q = request.query_params
        entries = await run_in_threadpool(
            self.repos.tree,
            await self.identity(request),
            key,
            revision,
            path,
            _flag(q.get("recursive")),
            _flag(q.get("expand")),
        )
        return self._paged(request, entries, self.hub.config.tree_page_size, raw_path, "cursor")

    async def _commits(self, request: Request, key: RepoKey, revision: str, raw_path: str) -> Response:
        commits = await run_in_threadpool(self.repos.commits, await self.identity(request), key, revision)
        return self._paged(request, commits, self.hub.config.commits_page_size, raw_path, "p")

    async def _paths_info(self, request: Request, key: RepoKey, revision: str) -> Response:
        body = (await _read_body(request, JSON_LIMIT)).decode()
        if request.headers.get("content-type", "").startswith("application/json"):
            data = json.loads(body or "{}")
            paths, expand = list(data.get("paths", [])), bool(data.get("expand"))
        else:
            form = parse_qs(body, keep_blank_values=True)
            paths, expand = form.get("paths", []), _flag((form.get("expand") or ["false"])[0])
        return await self._call(self.repos.paths_info, request, key, revision, paths, expand)

    async def _commit(self, request: Request, key: RepoKey, revision: str, create_pr: bool) -> Response:
        limit = self.hub.config.max_upload_bytes * 4 // 3 + 1024 * 1024
        body = await _read_body(request, limit)
        identity = await self.identity(request)
        if identity is None:
            raise Unauthorized("You must be authenticated (send a Bearer token) to commit.")
        self._limit("commit", identity)
        parsed = await run_in_threadpool(self.commits.parse_commit, parse_ndjson(body))
        result = await run_in_threadpool(
            self.commits.commit, identity, key, revision, parsed, create_pr, self.base_url(request)
        )
        return JSONResponse(result)

    async def _ref(
        self, request: Request, key: RepoKey, kind: Literal["branch", "tag"], name: str
    ) -> Response:
        identity = await self.identity(request)
        if request.method == "DELETE":
            await run_in_threadpool(self.repos.delete_ref, identity, key, kind, name)
            return JSONResponse({})
        body = await _json(request)
        if kind == "tag":
            # POST /tag/{revision} with {"tag": name}
            await run_in_threadpool(
                self.repos.create_ref, identity, key, "tag", str(body.get("tag", "")), name
            )
        else:
            await run_in_threadpool(
                self.repos.create_ref, identity, key, "branch", name, body.get("startingPoint")
            )
        return JSONResponse({})

    async def _settings(self, request: Request, key: RepoKey) -> Response:
        body: SettingsBody = _model(SettingsBody, await _json(request))
        private = body.visibility == "private" if body.visibility is not None else body.private
        await run_in_threadpool(
            self.repos.update_settings, await self.identity(request), key, private, body.gated
        )
        return JSONResponse({})

    async def _space_runtime(self, request: Request, key: RepoKey, what: str) -> Response:
        identity = await self.identity(request)
        body = await _json(request)
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")

        def run() -> dict[str, Any]:
            with self.hub.db.read() as conn:
                repo = self.hub.writable_repo(conn, identity, key.type, key.namespace, key.name)
            if what == "secrets":
                self.hub.spaces.set_secret(repo.repo_id, body.get("key"), body.get("value"))
                return {}
            if what == "variables":
                return self.hub.spaces.set_variable(repo.repo_id, body.get("key"), body.get("value"))
            return self.hub.spaces.request_hardware(repo.repo_id, body.get("flavor"))

        return JSONResponse(await run_in_threadpool(run))

    # files

    async def download(self, request: Request, key: RepoKey, revision: str, path: str) -> Response:
        identity = await self.identity(request)

        def lookup() -> tuple[str, str, dict[str, str]]:
            validate_path(path)
            with self.hub.db.read() as conn:
                repo = self.hub.downloadable_repo(conn, identity, key.type, key.namespace, key.name)
                commit = self.hub.resolve(conn, repo, revision)
                entry = self.hub.repos.files(conn, repo, commit.oid).get(path)
            if entry is None:
                err = EntryNotFound(repo.repo_id, path)
                err.headers["X-Repo-Commit"] = commit.oid
                raise err
            headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
            if entry.lfs:
                headers["ETag"] = f'"{entry.sha256}"'
                headers["X-Linked-Etag"] = f'"{entry.sha256}"'
                headers["X-Linked-Size"] = str(entry.size)
            else:
                headers["ETag"] = f'"{entry.oid}"'
            return entry.sha256, str(self.hub.blobs.path(entry.sha256)), headers

        _, blob_path, headers = await run_in_threadpool(lookup)
        response = FileResponse(blob_path, headers=headers, media_type="application/octet-stream")
        response.chunk_size = self.hub.config.download_chunk_bytes
        return response

    async def _lfs_batch(self, request: Request, key: RepoKey) -> Response:
        body = await _json(request)
        result = await run_in_threadpool(
            self.commits.lfs_batch, await self.identity(request), key, body, self.base_url(request)
        )
        return JSONResponse(result, media_type="application/vnd.git-lfs+json")

    async def _lfs_verify(self, request: Request, key: RepoKey) -> Response:
        return await self._with_json(request, self.commits.lfs_verify, key)

    def _upload_route(self, request: Request, method: str, seg: list[str]) -> Handler | None:
        q = request.query_params
        if not (q.get("size", "").isdigit() and q.get("expires", "").isdigit() and "sig" in q):
            return None
        repo_pk, oid, size, expires, sig = int(seg[0]), seg[1], int(q["size"]), int(q["expires"]), q["sig"]
        if len(seg) == 2 and method == "PUT":
            grant = UploadGrant("put", repo_pk, oid, size, 0, expires)
            return lambda: self._put_object(request, grant, sig)
        if len(seg) == 4 and seg[2] == "part" and seg[3].isdigit() and method == "PUT":
            grant = UploadGrant("part", repo_pk, oid, size, int(seg[3]), expires)
            return lambda: self._put_part(request, grant, sig)
        if len(seg) == 3 and seg[2] == "complete" and method == "POST":
            grant = UploadGrant("complete", repo_pk, oid, size, 0, expires)
            return lambda: self._complete(request, grant, sig)
        return None

    async def _put_object(self, request: Request, grant: UploadGrant, sig: str) -> Response:
        repo = await run_in_threadpool(self.commits.check_grant, grant, sig)
        tmp = self.hub.blobs.temp_path()
        digest = hashlib.sha256()
        received = 0
        try:
            with tmp.open("wb") as f:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > grant.size:
                        raise BadRequest(
                            f"Upload is larger than the {grant.size} bytes the link was issued for."
                        )
                    digest.update(chunk)
                    f.write(chunk)
            if received != grant.size or digest.hexdigest() != grant.oid:
                raise BadRequest(
                    f"Uploaded content does not match the link: expected sha256 {grant.oid} and {grant.size} bytes, "
                    f"got sha256 {digest.hexdigest()} and {received} bytes."
                )
            await run_in_threadpool(self.commits.finish_upload, repo, tmp, grant.oid, grant.size, True)
        finally:
            tmp.unlink(missing_ok=True)
        return Response(status_code=200)

    async def _put_part(self, request: Request, grant: UploadGrant, sig: str) -> Response:
        await run_in_threadpool(self.commits.check_grant, grant, sig)
        length = self.commits.part_length(grant)
        folder = self.commits.multipart_dir(grant)
        folder.mkdir(exist_ok=True)
        offset = (grant.part - 1) * self.hub.config.multipart_chunk_bytes
        hasher = self.commits.part_hasher(grant)  # parts in order: the sha256 grows as they arrive
        received = 0
        fd = os.open(folder / "data", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            async for chunk in request.stream():
                if received + len(chunk) > length:
                    raise BadRequest(f"Part {grant.part} is larger than its {length} bytes.")
                os.pwrite(fd, chunk, offset + received)
                received += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
        finally:
            os.close(fd)
        if received != length:
            raise BadRequest(f"Part {grant.part} has {received} bytes, expected {length}.")
        if hasher is not None:
            self.commits.part_hashed(grant, hasher)
        etag = secrets.token_hex(16)
        (folder / f"part-{grant.part}.etag").write_text(etag)
        return Response(status_code=200, headers={"ETag": f'"{etag}"'})

    async def _complete(self, request: Request, grant: UploadGrant, sig: str) -> Response:
        repo = await run_in_threadpool(self.commits.check_grant, grant, sig)
        body = await _json(request)
        await run_in_threadpool(self.commits.complete_multipart, repo, grant, body)
        return JSONResponse({})


def create_app(hub: LocalHub) -> FastAPI:
    """The ASGI application serving `hub`."""
    routes = HubApp(hub)
    app = FastAPI(title="localhub", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LocalHubError)
    async def _on_error(request: Request, exc: LocalHubError) -> Response:
        return _error_response(exc)

    app.add_api_route("/api/whoami-v2", routes.whoami, methods=["GET"])
    app.add_api_route("/api/repos/create", routes.create_repo, methods=["POST"])
    app.add_api_route("/api/repos/delete", routes.delete_repo, methods=["DELETE"])
    app.add_api_route("/api/validate-yaml", routes.validate_yaml, methods=["POST"])
    app.add_api_route("/api/settings/webhooks", routes.webhooks, methods=["GET", "POST"])
    app.add_api_route(
        "/api/settings/webhooks/{webhook_id}", routes.webhook, methods=["GET", "POST", "DELETE"]
    )
    app.add_api_route("/api/settings/webhooks/{webhook_id}/{action}", routes.webhook, methods=["POST"])
    app.add_api_route(
        "/{rest:path}",
        routes.dispatch,
        methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        include_in_schema=False,
    )
    return app
