"""``GET /v1/jobs/{id}/events``: a job's live progress as server-sent events (``text/event-stream``).

The SQL index stays the source of truth: the stream reads the job row every
``QKVAULT_EVENTS_POLL_S`` (in the thread pool, one short transaction each, like ``GET /v1/jobs/{id}``)
and sends what changed. Nothing is pushed by the worker; a worker's progress write reaches the
client within about one poll interval. What a client receives::

    retry: 1000                       (reconnect after 1 s if the stream breaks)
    event: job                        (at once: the GET /v1/jobs/{id} document)
    data: {"id": "...", "state": "running", "progress": {...}, ...}

    : keep-alive                      (after QKVAULT_EVENTS_KEEPALIVE_S without a message)

    event: job                        (again whenever the document changes)
    data: {...}

    event: end                        (once the job is terminal: the same document; then the
    data: {...}                        stream closes)

A stream closes early, and the client reconnects, when it has been open for
``QKVAULT_EVENTS_MAX_STREAM_S`` (a comment says so) or when the index stays unavailable past its
retry budget: then ``retry:`` carries the ``Retry-After`` in milliseconds and ``event: error`` the
503 ``index-unavailable`` problem document (never a 500, never a dead server). A client that goes
away ends its stream at the next poll at the latest: the poll loop stops, no thread or database
session stays behind.

Auth and ownership are those of every ``/v1/jobs`` route (checked before the stream starts: 401,
and 404 for a missing job or another owner's). Browsers read the stream with ``fetch()`` and a
streaming reader, since ``EventSource`` cannot send the ``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import IndexDep, JobDep, OwnerScopeDep, RootPathDep, SettingsDep, get_principal
from api.problems import PROBLEM_JSON
from api.schemas import ProblemDoc, job_public
from api.settings import ApiSettings
from storage.errors import IndexUnavailable, QkvaultError
from storage.index import TERMINAL_STATES, Index, JobRecord
from storage.index.retry import is_transient

log = logging.getLogger("qkvault.api.events")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(get_principal)])

EVENT_STREAM = "text/event-stream"
RECONNECT_MS = 1000  # the `retry:` a client gets for a stream that breaks or reaches its time limit
KEEPALIVE = b": keep-alive\n\n"
STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each message on at once instead of buffering the body
}


@dataclass(frozen=True)
class StreamTiming:
    """How one event stream paces itself (the API's ``events_*`` settings), in seconds."""

    poll_s: float
    keepalive_s: float
    max_stream_s: float

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> StreamTiming:
        return cls(settings.events_poll_s, settings.events_keepalive_s, settings.events_max_stream_s)


def sse_message(event: str, data: str, *, retry_ms: int | None = None) -> bytes:
    """One SSE message: ``retry:`` (optional), ``event:``, ``data:`` (one line: compact JSON)."""
    assert "\n" not in data and "\r" not in data, "SSE data must be one line here"
    head = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def _problem_message(problem: dict[str, Any], *, retry_ms: int | None = None) -> bytes:
    return sse_message("error", json.dumps(problem, separators=(",", ":")), retry_ms=retry_ms)


def _index_unavailable(exc: Exception, instance: str) -> bytes:
    """``event: error`` with the 503 problem document, and ``retry:`` = its Retry-After."""
    if not isinstance(exc, IndexUnavailable):  # a transient error that escaped the index's retries
        exc = IndexUnavailable(
            f"the index database is unavailable ({type(exc).__name__}); reconnect shortly", retry_after_s=1
        )
    problem = {**exc.to_problem(), "status": exc.status, "instance": instance}
    problem["retry_after_s"] = exc.retry_after_s
    return _problem_message(problem, retry_ms=exc.retry_after_s * 1000)


async def job_event_stream(
    request: Request,
    job: JobRecord,
    *,
    index: Index,
    scope: str | None,
    root_path: str,
    timing: StreamTiming,
) -> AsyncIterator[bytes]:
    """The messages of one stream (module docstring), from ``job`` as first read until the job is
    terminal, the client leaves, the time limit passes or the index stays unavailable."""
    instance = request.url.path
    started = last_sent = time.monotonic()
    reason = "cancelled (client disconnected or server shutting down)"
    try:
        doc = job_public(job, root_path).model_dump_json()
        yield sse_message("job", doc, retry_ms=RECONNECT_MS)
        while job.state not in TERMINAL_STATES:
            await anyio.sleep(timing.poll_s)
            if await request.is_disconnected():
                reason = "client disconnected"
                return
            now = time.monotonic()
            if now - started >= timing.max_stream_s:
                reason = "time limit"
                yield (
                    f": open for {timing.max_stream_s:g} s (QKVAULT_EVENTS_MAX_STREAM_S); "
                    "reconnect to follow on\n\n"
                ).encode()
                return
            try:
                job = await run_in_threadpool(index.get_job, job.id, scope)
            except Exception as exc:
                if not (isinstance(exc, IndexUnavailable) or is_transient(exc)):
                    raise
                reason = f"index unavailable ({type(exc).__name__})"
                log.warning("event stream of job %s: %s; the client is told to reconnect", job.id, exc)
                yield _index_unavailable(exc, instance)
                return
            fresh = job_public(job, root_path).model_dump_json()
            if fresh != doc:
                doc = fresh
                last_sent = time.monotonic()
                yield sse_message("job", doc)
            elif time.monotonic() - last_sent >= timing.keepalive_s:
                last_sent = time.monotonic()
                yield KEEPALIVE
        reason = f"job {job.state}"
        yield sse_message("end", doc)
    except QkvaultError as exc:  # e.g. the job vanished (404): say so as data, the response has started
        reason = exc.problem_type
        yield _problem_message({**exc.to_problem(), "status": exc.status, "instance": instance})
    finally:
        log.debug(
            "event stream of job %s closed after %.1f s: %s", job.id, time.monotonic() - started, reason
        )


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="Follow a job's progress (server-sent events)",
    responses={
        200: {
            "content": {EVENT_STREAM: {}},
            "description": "`event: job` (the GET /v1/jobs/{id} document) at once and on every change, "
            "`: keep-alive` comments, `event: end` (the same document) once the job is terminal",
        },
        **{s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in (401, 404, 503)},
    },
)
async def job_events(
    request: Request,
    job: JobDep,
    index: IndexDep,
    scope: OwnerScopeDep,
    settings: SettingsDep,
    root_path: RootPathDep,
) -> StreamingResponse:
    """A ``text/event-stream`` of the job: ``event: job`` with the same JSON as ``GET /v1/jobs/{id}``
    at once and again whenever it changes (read from the index every ``QKVAULT_EVENTS_POLL_S``),
    a ``: keep-alive`` comment after ``QKVAULT_EVENTS_KEEPALIVE_S`` of silence, and ``event: end``
    (the same JSON) once the job is succeeded, failed or cancelled; then the stream closes.

    A stream open for ``QKVAULT_EVENTS_MAX_STREAM_S`` closes without ``end``: reconnect (after the
    ``retry:`` milliseconds). When the index stays unavailable, ``event: error`` carries the 503
    ``index-unavailable`` problem document and ``retry:`` its Retry-After; then the stream closes.
    Browsers: read it with ``fetch()`` (``EventSource`` cannot send the Authorization header)."""
    stream = job_event_stream(
        request,
        job,
        index=index,
        scope=scope,
        root_path=root_path,
        timing=StreamTiming.from_settings(settings),
    )
    return StreamingResponse(stream, media_type=EVENT_STREAM, headers=STREAM_HEADERS)
