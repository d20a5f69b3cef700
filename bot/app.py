"""The HTTP face of the bot (FastAPI): the webhook, a health check and a read-only queue view.

The webhook answers at once: the secret is checked first, the body is read up to
:data:`bot.webhooks.MAX_BODY_BYTES` (413 beyond), malformed or too deeply nested JSON is a 400,
and the delivery is only recorded; its handling runs on the queue's light executor.
``/jobs`` names requesters and destinations only of public jobs, unless the request carries the
operator's secret (the webhook secret) as ``Authorization: Bearer <secret>``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bot.jobs import ACTIVE, Job, is_guest
from bot.service import Bot
from bot.webhooks import (
    MAX_BODY_BYTES,
    WebhookRejected,
    check_length,
    check_secret,
    is_operator,
    load_json,
)

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/webhooks/mergebot"


def create_app(bot: Bot, *, manage: bool = True, run_jobs: bool = True) -> FastAPI:
    """The app; with ``manage`` it starts the bot on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage:
            await run_in_threadpool(lambda: bot.start(run_jobs=run_jobs))
        try:
            yield
        finally:
            if manage:
                bot.stop()

    app = FastAPI(title="mergebot", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    secret = bot.settings.webhook_secret.get_secret_value()

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> JSONResponse:
        try:
            check_secret(request.headers.get("X-Webhook-Secret"), secret)
            check_length(request.headers.get("Content-Length"))
            payload: Any = load_json(await _read_body(request))
            new = await run_in_threadpool(bot.receive, payload)
        except WebhookRejected as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"accepted": True, "duplicate": not new}, status_code=202 if new else 200)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "bot": bot.name}

    @app.get("/jobs")
    async def jobs(request: Request) -> list[dict[str, Any]]:
        """The queue: waiting and running jobs, in order (no secrets, no recipes; see the module docstring)."""
        operator = is_operator(request.headers.get("Authorization"), secret)
        listed = await run_in_threadpool(bot.store.all, states=ACTIVE)
        return [_job_view(j, operator) for j in listed]

    return app


def _job_view(job: Job, operator: bool) -> dict[str, Any]:
    shown = operator or not job.spec.private
    requester = job.spec.requester
    return {
        "id": job.id,
        "kind": job.spec.kind,
        "requester": (requester if operator or not is_guest(requester) else "guest") if shown else None,
        "destination": job.spec.destination if shown else None,
        "private": job.spec.private,
        "state": job.state,
        "progress": job.progress,
    }


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it passes the limit (a missing or false Content-Length is no help).

    Raises:
        WebhookRejected: 413.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise WebhookRejected(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
