"""The HTTP face of the bot (FastAPI): the webhook, a health check and a read-only queue view."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bot.jobs import ACTIVE
from bot.service import Bot
from bot.webhooks import WebhookRejected, check_secret

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
            try:
                payload: Any = await request.json()
            except ValueError:
                raise WebhookRejected(400, "the body is not JSON") from None
            new = await run_in_threadpool(bot.receive, payload)
        except WebhookRejected as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"accepted": True, "duplicate": not new}, status_code=202 if new else 200)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "bot": bot.name}

    @app.get("/jobs")
    async def jobs() -> list[dict[str, Any]]:
        """The queue: waiting and running jobs, in order (no secrets, no recipes)."""
        listed = await run_in_threadpool(bot.store.all, states=ACTIVE)
        return [
            {
                "id": j.id,
                "kind": j.spec.kind,
                "requester": j.spec.requester,
                "destination": j.spec.destination,
                "state": j.state,
                "progress": j.progress,
            }
            for j in listed
        ]

    return app
