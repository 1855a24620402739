"""Application factory: ``uvicorn --factory api.app:create_app``. No app object at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.middleware import BodySizeLimit
from api.problems import install_problem_handlers
from api.routes import arrays, events, health, jobs, tiles, ui, uploads
from api.services import Services
from api.settings import ApiSettings

log = logging.getLogger("qkvault.api")

API_VERSION = "0.1.0"

DESCRIPTION = """\
Bulk exports of attention, Q/K/V and KV cache from transformer language models.

Every `/v1` endpoint needs an API key: `Authorization: Bearer qk_...` (an administrator creates
keys with `qkvault keys create --owner NAME`). A key sees only its owner's jobs (an admin key sees
all); another owner's job id answers 404, like a missing one.

1. `POST /v1/jobs` with a job spec (model, prompts, generation, what to capture) → 202 and `Location`.
2. Poll `GET /v1/jobs/{id}` until `state` is `succeeded` (or `failed` / `cancelled`), or follow
   `GET /v1/jobs/{id}/events`: the same document as server-sent events, sent when it changes.
3. `GET /v1/jobs/{id}/bundle` downloads the Zarr v3 store as a zip; open it with
   `xr.open_zarr(zarr.storage.ZipStore(path, mode="r"), zarr_format=3)`; or, for bundles on S3,
   `GET /v1/jobs/{id}/bundle/urls` lists short-lived presigned URLs of the store's objects.

A bulk job reads many sequences from a `source` instead of `prompts`: inline texts or token ids, a
file sent first with `POST /v1/uploads` (JSONL, Parquet, text), or a dataset on the workers' disk.

Every error is an RFC 9457 problem document (`application/problem+json`).

A web page at `/ui/` (`GET /` redirects there) lists your jobs and draws their attention.
"""


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings if settings is not None else ApiSettings()
    services = Services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_startup:
            await run_in_threadpool(services.index.migrate)
        try:
            yield
        finally:
            services.close()

    app = FastAPI(
        title="qkvault",
        description=DESCRIPTION,
        version=API_VERSION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    # uploads stream into the store under their own limit (QKVAULT_MAX_UPLOAD_BYTES)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, streamed=[("POST", uploads.PREFIX)]
    )
    install_problem_handlers(app)  # after the middleware: its catch-all wraps them
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(uploads.router)
    app.include_router(arrays.router)
    app.include_router(tiles.router)
    app.include_router(ui.router)  # the web page: GET / -> /ui/ (docs/viewer.md)
    return app
