"""SQL side of the reconciler (``worker/reconciler.py``; DESIGN.md "Job lifecycle", issue 6).

Two finds and three transitions. Each transition is one conditional ``UPDATE``: it changes the row
only while the row is still exactly what the reconciler read (state, attempts, lease worker,
heartbeat, ``updated_at``, cancel flag). A worker that comes back and beats, a claim, a cancel
request or a second reconciler between the read and the write wins, and the transition returns
False (the next pass reads the row again).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from storage.index.lifecycle import LEASED_VALUES, SHARDED_LEASE
from storage.index.models import JobRow
from storage.index.records import JobRecord, JobState
from storage.index.repo import Index
from storage.index.retry import retried

DEFAULT_BATCH = 500  # rows per find: a pass stays short; the rest waits for the next pass


def _find(index: Index, *where: ColumnElement[bool], order: Any, limit: int) -> list[JobRecord]:
    stmt = select(JobRow).where(*where).order_by(order).limit(limit)
    return index.transact(lambda session: [row.to_record() for row in session.scalars(stmt)])


def stale_queued(index: Index, *, untouched_since: datetime, limit: int = DEFAULT_BATCH) -> list[JobRecord]:
    """Queued jobs whose row has not changed since ``untouched_since`` (created, or last
    re-enqueued, before it): candidates for a lost message, oldest first."""
    return _find(
        index,
        JobRow.state == JobState.QUEUED.value,
        JobRow.updated_at < untouched_since,
        order=JobRow.updated_at,
        limit=limit,
    )


def expired_leases(index: Index, *, beat_before: datetime, limit: int = DEFAULT_BATCH) -> list[JobRecord]:
    """Running or cancelling jobs whose last heartbeat is older than ``beat_before`` (a job with no
    heartbeat at all is judged by ``updated_at``): their worker is gone."""
    return _find(
        index,
        JobRow.state.in_(LEASED_VALUES),
        or_(JobRow.lease_worker.is_(None), JobRow.lease_worker != SHARDED_LEASE),  # shards: their own pass
        or_(
            JobRow.heartbeat_at < beat_before,
            and_(JobRow.heartbeat_at.is_(None), JobRow.updated_at < beat_before),
        ),
        order=JobRow.heartbeat_at,
        limit=limit,
    )


def _same(column: InstrumentedAttribute[Any], value: Any) -> ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _apply(index: Index, seen: JobRecord, values: dict[str, Any]) -> bool:
    """UPDATE the job with ``values`` if its row is still as ``seen``; True when it was changed
    (also on a retry after this UPDATE's COMMIT landed: the row then has ``values``' ``updated_at``)."""
    stmt = (
        update(JobRow)
        .where(
            JobRow.id == seen.id,
            JobRow.state == seen.state.value,
            JobRow.attempts == seen.attempts,
            JobRow.cancel_requested == seen.cancel_requested,
            JobRow.updated_at == seen.updated_at,
            _same(JobRow.lease_worker, seen.lease_worker),
            _same(JobRow.heartbeat_at, seen.heartbeat_at),
        )
        .values(**values)
        .returning(JobRow.id)
    )
    mine = select(JobRow.id).where(JobRow.id == seen.id, JobRow.updated_at == values["updated_at"])

    def work(session: Session) -> bool:
        if session.scalars(stmt).first() is not None:
            return True
        return retried(session) and session.scalars(mine).first() is not None

    return index.transact(work, write=True)


def mark_requeued(index: Index, seen: JobRecord, now: datetime) -> bool:
    """A queued job is being re-enqueued: bump ``updated_at`` so the next passes leave it alone for
    ``requeue_after_s``. Only one of several reconcilers gets True (and sends the message)."""
    return _apply(index, seen, {"updated_at": now})


def requeue_expired(index: Index, seen: JobRecord, now: datetime) -> bool:
    """Running job whose lease expired -> queued, lease cleared; the next claim is the next attempt."""
    values = {"state": JobState.QUEUED.value, "lease_worker": None, "heartbeat_at": None, "updated_at": now}
    return _apply(index, seen, values)


def end_expired(
    index: Index, seen: JobRecord, state: JobState, now: datetime, *, error: dict[str, Any] | None = None
) -> bool:
    """Job whose lease expired -> ``state`` (cancelled or failed), lease released; ``partial`` when
    chunks were recorded (counted in SQL, so a chunk recorded after the read still counts)."""
    values = {
        "state": JobState(state).value,
        "finished_at": now,
        "updated_at": now,
        "lease_worker": None,
        "partial": JobRow.chunks_written > 0,
        "error": error,
        "result": None,
    }
    return _apply(index, seen, values)


def lease_expired_problem(seen: JobRecord, lease_timeout_s: float, now: datetime) -> dict[str, Any]:
    """The problem document of a job failed because its last allowed attempt lost its worker."""
    beat = seen.heartbeat_at.isoformat() if seen.heartbeat_at else None
    return {
        "type": "lease-expired",
        "title": "Lease expired",
        "detail": (
            f"job {seen.id}: worker {seen.lease_worker} stopped renewing its lease (last heartbeat "
            f"{beat}, no heartbeat for more than {lease_timeout_s:g} s) during attempt {seen.attempts} "
            f"of {seen.max_attempts}; the worker was probably lost (out of memory, killed, "
            "preempted). Resubmit the job, or raise QKVAULT_MAX_ATTEMPTS for new jobs."
        ),
        "attempts": seen.attempts,
        "max_attempts": seen.max_attempts,
        "last_worker": seen.lease_worker,
        "last_heartbeat_at": beat,
        "detected_at": now.isoformat(),
    }
