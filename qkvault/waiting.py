"""``Client.wait``: follow a job until it ends, showing its progress.

The job's server-sent events first (:func:`qkvault.events.follow_job`: a change shows at once,
nothing is fetched while nothing changes); polling ``GET /v1/jobs/{id}`` every ``poll_s`` when the
server has no event stream (an older server answers 404/405) or the stream kept breaking after a
few reconnections. Either way the same status line is shown (:class:`~qkvault.progress.ProgressLine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from qkvault.errors import JobFailed, QkvaultClientError, WaitTimeout
from qkvault.events import TRANSIENT_STATUSES, EventsUnavailable, follow_job
from qkvault.job import Job
from qkvault.progress import ProgressLine

if TYPE_CHECKING:
    from qkvault.client import Client

TRANSIENT_TOLERANCE_S = 60.0  # polling: unreachable server / 502-504 tolerated this long in a row


def wait_for_job(
    client: Client,
    job_id: str,
    *,
    poll_s: float,
    timeout_s: float | None,
    progress: bool,
    stream: TextIO | None,
    events: bool,
) -> Job:
    """The job once terminal; :class:`JobFailed` when it failed, :class:`WaitTimeout` after
    ``timeout_s`` (see :meth:`qkvault.client.Client.wait`)."""
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printer = ProgressLine(stream) if progress else None

    def show(job: Job) -> Job:
        if printer:
            printer.update(job.status_line(), key=(job.state, job.phase))
        return job

    job: Job | None = None
    try:
        if events:
            try:
                for job in follow_job(client, job_id, deadline=deadline):
                    show(job)
            except EventsUnavailable:
                pass  # an older server, or a stream that kept breaking: poll instead
        if job is None or not job.terminal:
            job = _poll(client, job_id, poll_s, deadline, show, printer, last=job)
    finally:
        if printer:
            printer.close()
    if job is None or not job.terminal:
        last = f" (last seen: {job.status_line()})" if job else ""
        raise WaitTimeout(
            f"job {job_id} not finished after {timeout_s:g} s{last}; it keeps running: wait again or "
            "cancel it"
        )
    if job.state == "failed":
        raise JobFailed(job)
    return job


def _poll(
    client: Client,
    job_id: str,
    poll_s: float,
    deadline: float | None,
    show: Callable[[Job], Job],
    printer: ProgressLine | None,
    *,
    last: Job | None,
) -> Job | None:
    """``GET /v1/jobs/{id}`` every ``poll_s`` (at least once) until the job is terminal, or the
    deadline passed: then the last job seen (``last`` if no poll got an answer). Transient errors
    are retried for up to :data:`TRANSIENT_TOLERANCE_S` in a row."""
    transient_since: float | None = None
    job = last
    while True:
        try:
            job = show(client.get(job_id))
            transient_since = None
        except QkvaultClientError as exc:
            if exc.status is not None and exc.status not in TRANSIENT_STATUSES:
                raise
            now = time.monotonic()
            transient_since = transient_since or now
            if now - transient_since > TRANSIENT_TOLERANCE_S:
                raise
            if printer:
                printer.update(f"[retrying] {exc.message.splitlines()[0][:120]}", key="retry")
        else:
            if job.terminal:
                return job
        if deadline is not None and time.monotonic() >= deadline:
            return job
        pause = poll_s if transient_since is None else min(max(poll_s, 1.0) * 2, 5.0)
        if deadline is not None:
            pause = max(min(pause, deadline - time.monotonic()), 0.0)
        time.sleep(pause)
