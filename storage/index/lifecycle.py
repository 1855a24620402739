"""Job state transitions (DESIGN.md, "Job lifecycle"), applied to a ``JobRow`` locked by the caller.

::

    queued --claim--> running --request_cancel--> cancelling --claim/finish--> cancelled
      |                  |--finish--> succeeded | failed | cancelled
      |                  '--release (transient failure)--> queued
      '--request_cancel--> cancelled       (claim past max_attempts --> failed)

A claim never takes a lease that another worker renewed less than ``lease_timeout_s`` ago: a
duplicate delivery of a running job's message does nothing (fencing; docs/reliability.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from storage.errors import JobStateConflict
from storage.index.models import JobRow
from storage.index.records import TERMINAL_STATES, JobState

DEFAULT_LEASE_TIMEOUT_S = 120.0  # Settings.lease_timeout_s's default
LEASED_STATES = frozenset({JobState.RUNNING, JobState.CANCELLING})
LEASED_VALUES = tuple(sorted(s.value for s in LEASED_STATES))  # as stored in the ``state`` column
# jobs.lease_worker of a bulk job whose shards run (storage/index/shards.py): each shard has its own
# lease; the job-level reconciler leaves such a job to the shard pass
SHARDED_LEASE = "qkvault:shards"


def end(
    row: JobRow,
    state: JobState,
    now: datetime,
    *,
    partial: bool,
    error: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    """Move to a terminal ``state`` and release the lease (heartbeat_at keeps the last beat)."""
    row.state = state.value
    row.finished_at = now
    row.updated_at = now
    row.lease_worker = None
    row.partial = partial
    row.error = None if error is None else dict(error)
    row.result = None if result is None else dict(result)


def request_cancel(row: JobRow, now: datetime) -> None:
    """Queued -> cancelled; running -> cancelling; cancelling stays; a finished job conflicts."""
    state = JobState(row.state)
    if state in TERMINAL_STATES:
        raise JobStateConflict(
            f"job {row.id} is already {state.value}: only queued or running jobs can be cancelled",
            detail={"job_id": row.id, "state": state.value},
        )
    if state is JobState.QUEUED:
        row.cancel_requested = True
        end(row, JobState.CANCELLED, now, partial=False)
    elif state is JobState.RUNNING:
        row.state = JobState.CANCELLING.value
        row.cancel_requested = True
        row.updated_at = now


def lease_is_live(row: JobRow, worker_id: str, now: datetime, lease_timeout_s: float) -> bool:
    """Another worker holds a lease on the running job and renewed it less than ``lease_timeout_s`` ago."""
    if JobState(row.state) not in LEASED_STATES or row.lease_worker in (None, worker_id):
        return False
    beat = row.heartbeat_at or row.updated_at
    return now - beat < timedelta(seconds=lease_timeout_s)


def claim(
    row: JobRow, worker_id: str, now: datetime, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S
) -> bool:
    """Start an attempt for ``worker_id``; False (after ending the job if due) when it must not run.

    A live lease of another worker wins: False, nothing changes (the attempts are not counted).
    """
    state = JobState(row.state)
    if state in TERMINAL_STATES:
        return False
    if lease_is_live(row, worker_id, now, lease_timeout_s):
        return False  # a duplicate delivery: the live attempt goes on (and handles a cancel itself)
    if row.cancel_requested or state is JobState.CANCELLING:
        end(row, JobState.CANCELLED, now, partial=row.chunks_written > 0)
        return False
    if row.attempts >= row.max_attempts:
        end(row, JobState.FAILED, now, partial=row.chunks_written > 0, error=attempts_exhausted(row))
        return False
    row.state = JobState.RUNNING.value
    row.attempts += 1
    row.lease_worker = worker_id
    row.heartbeat_at = now
    row.started_at = row.started_at or now
    row.updated_at = now
    return True


def holds_lease(row: JobRow, worker_id: str) -> bool:
    """``worker_id`` still holds the lease of a running (or cancelling) job."""
    return JobState(row.state) in LEASED_STATES and row.lease_worker == worker_id


def release(row: JobRow, now: datetime, *, error: dict[str, Any] | None = None) -> JobState:
    """The lease holder gives the job back after a transient failure: queued again (the next claim
    is the next attempt), with ``error`` (the failure) kept until the job ends; or cancelled when a
    cancel was requested meanwhile."""
    if row.cancel_requested or JobState(row.state) is JobState.CANCELLING:
        end(row, JobState.CANCELLED, now, partial=row.chunks_written > 0)
        return JobState.CANCELLED
    if error is not None:
        row.error = dict(error)
    row.state = JobState.QUEUED.value
    row.lease_worker = None
    row.heartbeat_at = None
    row.updated_at = now
    return JobState.QUEUED


def finish(
    row: JobRow,
    state: JobState,
    now: datetime,
    *,
    partial: bool,
    error: dict[str, Any] | None,
    result: dict[str, Any] | None,
) -> None:
    """End a job that has not ended yet (a second finish conflicts)."""
    if JobState(row.state) in TERMINAL_STATES:
        raise JobStateConflict(
            f"job {row.id} already ended as {row.state}; it cannot be finished again",
            detail={"job_id": row.id, "state": row.state},
        )
    end(row, state, now, partial=partial, error=error, result=result)


def attempts_exhausted(row: JobRow) -> dict[str, Any]:
    """The problem document stored when a job is claimed once more than ``max_attempts`` allows."""
    return {
        "type": "attempts-exhausted",
        "title": "Attempts exhausted",
        "detail": (
            f"job {row.id} was started {row.attempts} times (max_attempts={row.max_attempts}) "
            "without finishing; the worker was probably lost (out of memory, killed, preempted). "
            "Resubmit the job, or raise QKVAULT_MAX_ATTEMPTS for new jobs."
        ),
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "last_worker": row.lease_worker,
    }
