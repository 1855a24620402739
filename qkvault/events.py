"""Following a job through the API's server-sent events (``GET /v1/jobs/{id}/events``).

:func:`follow_job` yields the job (:class:`~qkvault.job.Job`) each time the server reports a change
and returns once it is terminal (the server's ``event: end``). A stream that breaks (connection
lost, a server restart, the server's time limit on one stream, ``event: error`` while its index is
unavailable) is opened again after the server's ``retry:`` delay; after ``reconnects`` attempts in a
row that brought no news, or at once when the server has no such route (an older server: 404, 405),
it raises :class:`EventsUnavailable` and the caller polls ``GET /v1/jobs/{id}`` instead
(:func:`qkvault.waiting.wait_for_job` does). A missing or revoked API key is not retried: 401/403
raise :class:`~qkvault.errors.QkvaultClientError` as every other call does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from qkvault.errors import QkvaultClientError
from qkvault.job import Job
from qkvault.sse import SseParser

if TYPE_CHECKING:
    from qkvault.client import Client

EVENT_STREAM = "text/event-stream"
DEFAULT_RECONNECTS = 3
# The server sends a keep-alive comment at least every 30 s (QKVAULT_EVENTS_KEEPALIVE_S, 15 s by
# default): a stream silent for longer than this is broken.
STREAM_READ_TIMEOUT_S = 60.0
DEFAULT_RETRY_S = 1.0  # reconnection delay when the server sent no `retry:`
MAX_RETRY_S = 30.0
NO_RETRY_STATUSES = frozenset({401, 403})  # the key is wrong: reconnecting cannot help
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class EventsUnavailable(QkvaultClientError):
    """The server gives no usable event stream for this job (no such route, or it kept breaking):
    poll ``GET /v1/jobs/{id}`` instead."""


def _stream_timeout(client: Client, deadline: float | None) -> httpx.Timeout:
    read_s = max(client.timeout_s, STREAM_READ_TIMEOUT_S)
    if deadline is not None:
        read_s = max(min(read_s, deadline - time.monotonic()), 0.05)
    return httpx.Timeout(client.timeout_s, connect=min(client.timeout_s, 10.0), read=read_s)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def follow_job(
    client: Client, job_id: str, *, reconnects: int = DEFAULT_RECONNECTS, deadline: float | None = None
) -> Iterator[Job]:
    """Yield the job at once and after every change until it is terminal (module docstring).
    ``deadline`` (``time.monotonic()``): stop quietly then, terminal or not."""
    path = client._job_path(job_id, "/events")
    what = f"GET {path}"
    failures = 0  # attempts in a row that brought no job document
    retry_s = DEFAULT_RETRY_S
    last_data: str | None = None
    problem: str = "the stream closed before the job ended"
    while deadline is None or time.monotonic() < deadline:
        parser = SseParser()
        try:
            with client._http().stream(
                "GET", path, headers={"Accept": EVENT_STREAM}, timeout=_stream_timeout(client, deadline)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    err = client._error(response)
                    if response.status_code in NO_RETRY_STATUSES:
                        raise err
                    if response.status_code not in TRANSIENT_STATUSES:
                        raise EventsUnavailable(f"{what}: {err.message}", status=err.status) from err
                    problem, retry_s = err.message, _retry_after_s(response) or retry_s
                else:
                    ctype = response.headers.get("content-type", "")
                    if not ctype.startswith(EVENT_STREAM):
                        raise EventsUnavailable(f"{what} answered {ctype or 'no content type'}, not events")
                    for message in parser.feed(response.iter_lines()):
                        if message.event == "error":
                            problem = _problem_text(message.data)
                            continue  # the server closes the stream next; `retry:` says when to come back
                        if message.event not in ("job", "end"):
                            continue
                        if message.data != last_data:
                            last_data = message.data
                            yield _job(message.data, what)
                        failures = 0
                        if message.event == "end":
                            return
                    if parser.retry_ms is not None:
                        retry_s = parser.retry_ms / 1000
        except httpx.TimeoutException as exc:
            problem = f"no message for {STREAM_READ_TIMEOUT_S:g} s ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            problem = str(client._unreachable(exc, what))
        if deadline is not None and time.monotonic() >= deadline:
            return
        failures += 1
        if failures > reconnects:
            raise EventsUnavailable(f"{what}: gave up after {failures} attempts: {problem}")
        pause = min(retry_s, MAX_RETRY_S)
        if deadline is not None:
            pause = min(pause, max(deadline - time.monotonic(), 0.0))
        time.sleep(pause)


def _job(data: str, what: str) -> Job:
    try:
        return Job.from_api(json.loads(data))
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise EventsUnavailable(f"{what}: not a job document in the stream: {exc}") from exc


def _problem_text(data: str) -> str:
    try:
        problem = json.loads(data)
    except ValueError:
        return data[:200]
    if not isinstance(problem, dict):
        return data[:200]
    return str(QkvaultClientError.from_problem(problem))
