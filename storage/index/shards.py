"""Shards of a bulk job in the SQL index (``job_shards``; docs/scale-out in docs/operations.md).

A sharded bulk job is planned once (every micro-batch of the job numbered, as one worker would),
then cut into shards, each a range of micro-batches that any worker runs. The job row stays the
job's (state, cancel flag, estimate, outcome); while its shards run, its lease is held by
:data:`SHARDED_LEASE` rather than by a worker, and its progress is the sum of its shards'. Each
shard carries what a job carries for one worker:

- a **lease** (``lease_worker``, ``heartbeat_at``) taken by :func:`claim_shard` and never taken
  from a worker that renewed it less than ``lease_timeout_s`` ago;
- **fencing**: :func:`shard_heartbeat`, :func:`shard_progress`, :func:`record_shard_chunks`,
  :func:`finish_shard` and :func:`release_shard` raise :class:`~storage.errors.LeaseLost` (and change
  nothing) once the worker no longer holds the shard's lease or the job ended;
- an **attempt cap** (``attempts`` / ``max_attempts``, the job's ``max_attempts``);
- chunk records under the job (disjoint micro-batch groups), so a retried shard resumes by chunk.

A job whose shard failed for good, or on which a cancel was requested, is **stopping**
(:func:`is_stopping`): its queued shards are cancelled, its running ones stop at their next check
(each reads :func:`is_stopping` where it would read the job's cancel flag) and end ``cancelled``;
the shard's problem is on the job meanwhile. Once no shard runs (:func:`finalize_due`),
:func:`claim_finalize` hands the job to one worker that writes the sequence table and the root
metadata: of every micro-batch when every shard succeeded, else of the finished ones (the job then
ends ``failed`` with the shard's problem, or ``cancelled``, ``partial`` either way), as one worker
keeps what it finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from storage.bundle.records import ChunkRecord
from storage.errors import JobNotFound, LeaseLost
from storage.index import lifecycle
from storage.index.models import JobRow, ShardRow, utcnow
from storage.index.records import TERMINAL_STATES, JobRecord, JobState
from storage.index.repo import Index, chunk_params, upsert_chunks
from storage.index.retry import retried

__all__ = [
    "SHARDED_LEASE",
    "ShardPlan",
    "ShardRecord",
    "claim_finalize",
    "claim_shard",
    "create_shards",
    "finalize_due",
    "finish_shard",
    "is_stopping",
    "list_shards",
    "record_shard_chunks",
    "release_shard",
    "shard_heartbeat",
    "shard_progress",
]

SHARDED_LEASE = lifecycle.SHARDED_LEASE
# what a shard's range (first_batch, batches) counts: a bulk job's micro-batches, or a one-batch
# job's exported layers (positions in its layout; worker/layershards.py)
ShardUnit = Literal["micro_batches", "layers"]
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ENDED = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True)
class ShardPlan:
    """What the planner knows of a shard: its micro-batches ``first_batch ..
    first_batch + batches - 1``, the planning window of the first (``first_window``) and the index
    of that window's first micro-batch (``window_first_batch``), its sequences and tokens."""

    first_window: int
    window_first_batch: int
    first_batch: int
    batches: int
    units_total: int
    tokens_planned: int
    padded_tokens: int


@dataclass(frozen=True)
class ShardRecord:
    """One row of ``job_shards`` (every datetime aware UTC)."""

    job_id: str
    shard: int
    state: str
    first_window: int
    window_first_batch: int
    first_batch: int
    batches: int
    units_total: int
    units_done: int
    tokens_planned: int
    padded_tokens: int
    tokens_done: int
    attempts: int
    max_attempts: int
    lease_worker: str | None
    last_worker: str | None
    heartbeat_at: datetime | None
    error: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: ShardRow) -> ShardRecord:
        values = {name: getattr(row, name) for name in cls.__dataclass_fields__}
        if isinstance(values["error"], dict):
            values["error"] = dict(values["error"])
        return cls(**values)

    def public(self, unit: ShardUnit = "micro_batches") -> dict[str, Any]:
        """The shard as the job's result shows it: its range of ``unit`` [first, end)."""
        return {
            "shard": self.shard,
            "state": self.state,
            unit: [self.first_batch, self.first_batch + self.batches],
            "sequences": self.units_total,
            "attempts": self.attempts,
            "worker": self.last_worker,
            **({"error": self.error} if self.error else {}),
        }


# -- helpers ---------------------------------------------------------------------------------------


def _job(session: Session, job_id: str, *, lock: bool = True) -> JobRow:
    stmt = select(JobRow).where(JobRow.id == job_id)
    row = session.scalars(stmt.with_for_update() if lock else stmt).one_or_none()
    if row is None:
        raise JobNotFound(f"job {job_id} not found", detail={"job_id": job_id})
    return row


def _shard(session: Session, job_id: str, shard: int) -> ShardRow:
    stmt = select(ShardRow).where(ShardRow.job_id == job_id, ShardRow.shard == shard).with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise JobNotFound(f"job {job_id} has no shard {shard}", detail={"job_id": job_id, "shard": shard})
    return row


def _shards(session: Session, job_id: str) -> list[ShardRow]:
    stmt = select(ShardRow).where(ShardRow.job_id == job_id).order_by(ShardRow.shard)
    return list(session.scalars(stmt))


def _fence(job: JobRow, row: ShardRow, worker: str) -> None:
    if row.state == RUNNING and row.lease_worker == worker and JobState(job.state) not in TERMINAL_STATES:
        return
    raise LeaseLost(
        f"job {job.id} shard {row.shard}: worker {worker} lost its lease (the shard is {row.state}, "
        f"lease held by {row.lease_worker or 'nobody'}, the job is {job.state}); this attempt stops "
        "without touching the shard",
        detail={"job_id": job.id, "shard": row.shard, "worker": worker, "lease_worker": row.lease_worker},
    )


def _aggregate(session: Session, job: JobRow, now: datetime) -> None:
    """The job's progress: the sum of its shards'."""
    of_job = ShardRow.job_id == job.id
    units, tokens = session.execute(
        select(
            func.coalesce(func.sum(ShardRow.units_done), 0), func.coalesce(func.sum(ShardRow.tokens_done), 0)
        ).where(of_job)
    ).one()
    job.units_done, job.tokens_done = int(units), int(tokens)
    job.heartbeat_at = now
    job.updated_at = now


def _end_shard(row: ShardRow, state: str, now: datetime, error: dict[str, Any] | None = None) -> None:
    row.state = state
    row.lease_worker = None
    row.finished_at = now
    row.updated_at = now
    if error is not None:
        row.error = dict(error)


def _any_failed(session: Session, job: JobRow) -> bool:
    """Whether a shard of the job failed for good."""
    failed = select(ShardRow.shard).where(ShardRow.job_id == job.id, ShardRow.state == FAILED)
    return session.scalars(failed.limit(1)).first() is not None


def _stopping(session: Session, job: JobRow) -> bool:
    """A cancel was requested on the job, or one of its shards failed for good."""
    return bool(job.cancel_requested) or _any_failed(session, job)


def _settle_job(session: Session, job: JobRow, now: datetime) -> None:
    """A stopping job's queued shards are cancelled (its running ones stop at their next check);
    once none runs the job waits for its finalize (:func:`claim_finalize`)."""
    if JobState(job.state) in TERMINAL_STATES or not _stopping(session, job):
        return
    for row in _shards(session, job.id):
        if row.state == QUEUED:
            _end_shard(row, CANCELLED, now)
    job.updated_at = now


def shard_summary(shards: Sequence[ShardRecord], unit: ShardUnit = "micro_batches") -> dict[str, Any]:
    """``result["shards"]`` of a sharded job: how many, and which worker ran which micro-batches
    (or exported layers: positions in the layout)."""
    return {"count": len(shards), "unit": unit, "runs": [s.public(unit) for s in shards]}


# -- planner ---------------------------------------------------------------------------------------


def create_shards(
    index: Index, job_id: str, plans: Sequence[ShardPlan], *, worker: str, max_attempts: int
) -> list[ShardRecord]:
    """Store the shards of a planned job (once: a second call returns the stored ones) and hand the
    job's lease to :data:`SHARDED_LEASE`. Fenced on ``worker``'s lease of the job."""

    def work(session: Session) -> list[ShardRecord]:
        job = _job(session, job_id)
        existing = _shards(session, job_id)
        if existing and job.lease_worker == SHARDED_LEASE:
            return [ShardRecord.of(r) for r in existing]
        if not lifecycle.holds_lease(job, worker):
            raise LeaseLost(f"job {job_id}: {worker} does not hold its lease; shards not created")
        now = utcnow()
        if not existing:
            for number, plan in enumerate(plans):
                session.add(
                    ShardRow(
                        job_id=job_id,
                        shard=number,
                        state=QUEUED,
                        first_window=plan.first_window,
                        window_first_batch=plan.window_first_batch,
                        first_batch=plan.first_batch,
                        batches=plan.batches,
                        units_total=plan.units_total,
                        units_done=0,
                        tokens_planned=plan.tokens_planned,
                        padded_tokens=plan.padded_tokens,
                        tokens_done=0,
                        attempts=0,
                        max_attempts=max_attempts,
                        lease_worker=None,
                        last_worker=None,
                        heartbeat_at=None,
                        error=None,
                        created_at=now,
                        updated_at=now,
                        started_at=None,
                        finished_at=None,
                    )
                )
            session.flush()
        job.lease_worker = SHARDED_LEASE
        job.phase = "shards"
        job.units_total = sum(p.units_total for p in plans) if not existing else job.units_total
        if not existing:
            job.tokens_total = sum(p.tokens_planned for p in plans)
        _aggregate(session, job, now)
        return [ShardRecord.of(r) for r in _shards(session, job_id)]

    return index.transact(work, write=True)


def list_shards(index: Index, job_id: str) -> list[ShardRecord]:
    """The job's shards, in order (empty: the job is not sharded)."""
    return index.transact(lambda session: [ShardRecord.of(r) for r in _shards(session, job_id)])


# -- shard workers ---------------------------------------------------------------------------------


def claim_shard(
    index: Index, job_id: str, shard: int, worker: str, *, lease_timeout_s: float
) -> ShardRecord | None:
    """Start an attempt of ``shard`` for ``worker``; None: do not run it (it ended, the job ended or
    was cancelled, another worker holds a live lease, or its attempts are used up: then the shard
    and the job fail)."""
    stamps: list[datetime] = []

    def work(session: Session) -> ShardRecord | None:
        job, row = _job(session, job_id), _shard(session, job_id, shard)
        if retried(session) and row.updated_at in stamps:
            return ShardRecord.of(row) if row.lease_worker == worker and row.state == RUNNING else None
        now = utcnow()
        stamps.append(now)
        if row.state in ENDED or JobState(job.state) in TERMINAL_STATES:
            return None
        if row.state == RUNNING and row.lease_worker not in (None, worker):
            beat = row.heartbeat_at or row.updated_at
            if now - beat < timedelta(seconds=lease_timeout_s):
                return None  # a duplicate delivery: the live attempt goes on
        if _stopping(session, job):
            _end_shard(row, CANCELLED, now)
            _settle_job(session, job, now)
            return None
        if row.attempts >= row.max_attempts:
            problem = exhausted_problem(job_id, row, unit_of(job.spec))
            _end_shard(row, FAILED, now, problem)
            _fail_job(session, job, problem, now)
            return None
        row.state = RUNNING
        row.attempts += 1
        row.lease_worker = row.last_worker = worker
        row.heartbeat_at = now
        row.started_at = row.started_at or now
        row.updated_at = now
        job.heartbeat_at = now
        return ShardRecord.of(row)

    return index.transact(work, write=True)


def unit_of(spec: dict[str, Any] | None) -> ShardUnit:
    """What the shards of a job with this (stored) spec count: micro-batches for a bulk job (its
    spec has a source), else exported layers."""
    return "micro_batches" if (spec or {}).get("source") else "layers"


def exhausted_problem(job_id: str, row: ShardRow | ShardRecord, unit: ShardUnit) -> dict[str, Any]:
    return {
        "type": "attempts-exhausted",
        "title": "Attempts exhausted",
        "detail": (
            f"job {job_id} shard {row.shard} ({unit.replace('_', '-')} {row.first_batch}..."
            f"{row.first_batch + row.batches - 1}) was started {row.attempts} times "
            f"(max_attempts={row.max_attempts}) without finishing; its worker was probably lost "
            "(out of memory, killed, preempted). Resubmit the job, or raise QKVAULT_MAX_ATTEMPTS."
        ),
        "shard": row.shard,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "last_worker": row.last_worker,
    }


def _fail_job(session: Session, job: JobRow, problem: dict[str, Any], now: datetime) -> None:
    """A shard failed for good: the job is stopping with its problem (shown on the job while the
    other shards stop; the finalize ends the job ``failed`` with it)."""
    if JobState(job.state) in TERMINAL_STATES:
        return
    if job.error is None or job.error.get("retrying"):
        job.error = dict(problem)
    job.phase = "stopping"
    _settle_job(session, job, now)


def shard_heartbeat(index: Index, job_id: str, shard: int, worker: str) -> bool:
    """Renew ``worker``'s lease of the shard (and the job's heartbeat); False when it lost it."""

    def work(session: Session) -> bool:
        now = utcnow()
        done = session.execute(
            update(ShardRow)
            .where(
                ShardRow.job_id == job_id,
                ShardRow.shard == shard,
                ShardRow.lease_worker == worker,
                ShardRow.state == RUNNING,
            )
            .values(heartbeat_at=now)
            .returning(ShardRow.shard)
        ).first()
        if done is None:
            return False
        session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state.in_(lifecycle.LEASED_VALUES))
            .values(heartbeat_at=now)
        )
        return True

    return index.transact(work, write=True)


def shard_progress(
    index: Index, job_id: str, shard: int, *, units_done: int, tokens_done: int, worker: str
) -> bool:
    """Record the shard's progress (the job's becomes the sum of its shards'); returns whether a
    cancel was requested on the job. Fenced (LeaseLost)."""

    def work(session: Session) -> bool:
        job, row = _job(session, job_id), _shard(session, job_id, shard)
        _fence(job, row, worker)
        now = utcnow()
        row.units_done, row.tokens_done = units_done, tokens_done
        row.heartbeat_at = row.updated_at = now
        session.flush()
        _aggregate(session, job, now)
        return _stopping(session, job)

    return index.transact(work, write=True)


def is_stopping(index: Index, job_id: str) -> bool:
    """Whether the job's shards should stop: a cancel was requested, or a shard failed for good
    (a shard's worker reads this where a job's worker reads the cancel flag)."""
    return index.transact(lambda session: _stopping(session, _job(session, job_id, lock=False)))


def finalize_due(index: Index, job_id: str) -> bool:
    """Whether the sharded job waits for its finalize: it has not ended and none of its shards is
    queued or running (every one succeeded, or the job stopped)."""

    def work(session: Session) -> bool:
        job = _job(session, job_id, lock=False)
        rows = _shards(session, job_id)
        leased = JobState(job.state) in lifecycle.LEASED_STATES and job.lease_worker == SHARDED_LEASE
        return leased and bool(rows) and all(r.state in ENDED for r in rows)

    return index.transact(work)


def record_shard_chunks(
    index: Index, job_id: str, shard: int, chunks: Sequence[ChunkRecord], *, worker: str
) -> None:
    """Record chunks the shard stored (under the job: shards write disjoint groups) and refresh the
    job's totals. Fenced (LeaseLost, nothing recorded)."""
    params = chunk_params(job_id, chunks)

    def work(session: Session) -> None:
        job, row = _job(session, job_id), _shard(session, job_id, shard)
        _fence(job, row, worker)
        upsert_chunks(session, job_id, params)

    index.transact(work, write=True)


def finish_shard(
    index: Index, job_id: str, shard: int, state: str, *, worker: str, error: dict[str, Any] | None = None
) -> bool:
    """End ``worker``'s attempt of the shard: ``succeeded``, ``cancelled`` (the job was stopping) or
    ``failed`` (the job stops, to fail with ``error``). Returns whether no shard of the job is queued
    or running any more (time to finalize). Fenced (LeaseLost)."""
    if state not in ENDED:
        raise ValueError(f"finish_shard needs succeeded, failed or cancelled, got {state!r}")

    def work(session: Session) -> bool:
        job, row = _job(session, job_id), _shard(session, job_id, shard)
        if retried(session) and row.state == state and row.last_worker == worker:
            return all(r.state in ENDED for r in _shards(session, job_id))
        _fence(job, row, worker)
        now = utcnow()
        _end_shard(row, state, now, error)
        session.flush()
        _aggregate(session, job, now)
        if state == FAILED:
            _fail_job(session, job, dict(error or {}), now)
        elif state == CANCELLED:
            _settle_job(session, job, now)
        return all(r.state in ENDED for r in _shards(session, job_id))

    return index.transact(work, write=True)


def release_shard(index: Index, job_id: str, shard: int, *, worker: str, error: dict[str, Any]) -> str:
    """Give the shard back after a transient failure (queued: the next claim is its next attempt),
    ``error`` kept on the shard. Fenced (LeaseLost)."""

    def work(session: Session) -> str:
        job, row = _job(session, job_id), _shard(session, job_id, shard)
        if retried(session) and row.state == QUEUED and row.last_worker == worker:
            return row.state
        _fence(job, row, worker)
        now = utcnow()
        row.state, row.lease_worker, row.heartbeat_at, row.updated_at = QUEUED, None, None, now
        row.error = dict(error)
        _settle_job(session, job, now)
        return row.state

    return index.transact(work, write=True)


# -- finalize --------------------------------------------------------------------------------------


def claim_finalize(index: Index, job_id: str, worker: str, *, lease_timeout_s: float) -> JobRecord | None:
    """Hand the job's lease to ``worker`` to write the sequence table and root metadata once no
    shard is queued or running (:func:`finalize_due`; or a finalizer's lease expired); else None."""

    def work(session: Session) -> JobRecord | None:
        job = _job(session, job_id)
        if JobState(job.state) not in lifecycle.LEASED_STATES:
            return None
        if job.lease_worker == worker:
            return job.to_record()
        now = utcnow()
        if job.lease_worker != SHARDED_LEASE:
            beat = job.heartbeat_at or job.updated_at
            if now - beat < timedelta(seconds=lease_timeout_s):
                return None  # another finalizer is at work
        rows = _shards(session, job_id)
        if not rows or any(r.state not in ENDED for r in rows):
            return None
        job.lease_worker = worker
        job.heartbeat_at = job.updated_at = now
        job.phase = "finalizing"
        return job.to_record()

    return index.transact(work, write=True)


def unfinalized(index: Index, *, untouched_since: datetime, limit: int = 500) -> list[str]:
    """Sharded jobs none of whose shards is queued or running, untouched since ``untouched_since``
    and not finalized: their finalize message was lost (the reconciler sends it again)."""
    ended = (
        select(ShardRow.job_id)
        .group_by(ShardRow.job_id)
        .having(func.sum(case((ShardRow.state.in_(sorted(ENDED)), 0), else_=1)) == 0)
    )
    stmt = (
        select(JobRow.id)
        .where(
            JobRow.state.in_(lifecycle.LEASED_VALUES),
            JobRow.lease_worker == SHARDED_LEASE,
            JobRow.updated_at < untouched_since,
            JobRow.id.in_(ended),
        )
        .limit(limit)
    )
    return index.transact(lambda session: list(session.scalars(stmt)))


def expired_shards(index: Index, *, beat_before: datetime, limit: int = 500) -> list[ShardRecord]:
    """Running shards whose last heartbeat is older than ``beat_before``: their worker is gone."""
    stmt = (
        select(ShardRow)
        .where(ShardRow.state == RUNNING, ShardRow.heartbeat_at < beat_before)
        .order_by(ShardRow.heartbeat_at)
        .limit(limit)
    )
    return index.transact(lambda session: [ShardRecord.of(r) for r in session.scalars(stmt)])


def stale_queued_shards(index: Index, *, untouched_since: datetime, limit: int = 500) -> list[ShardRecord]:
    """Queued shards of running jobs untouched since ``untouched_since``: candidates for a lost message."""
    stmt = (
        select(ShardRow)
        .join(JobRow, JobRow.id == ShardRow.job_id)
        .where(
            ShardRow.state == QUEUED,
            ShardRow.updated_at < untouched_since,
            JobRow.state.in_(lifecycle.LEASED_VALUES),
        )
        .order_by(ShardRow.updated_at)
        .limit(limit)
    )
    return index.transact(lambda session: [ShardRecord.of(r) for r in session.scalars(stmt)])


def expire_shard(index: Index, seen: ShardRecord, now: datetime) -> str | None:
    """The reconciler's transition of a shard whose lease expired, if the row is still as it read
    it: ``cancelled`` (cancel requested), ``failed`` (attempts used up: the job fails),
    or ``queued`` (to be sent again); None when the row changed meanwhile."""

    def work(session: Session) -> str | None:
        job, row = _job(session, seen.job_id), _shard(session, seen.job_id, seen.shard)
        if (row.state, row.lease_worker, row.heartbeat_at, row.attempts) != (
            RUNNING,
            seen.lease_worker,
            seen.heartbeat_at,
            seen.attempts,
        ):
            return None
        if JobState(job.state) in TERMINAL_STATES or _stopping(session, job):
            _end_shard(row, CANCELLED, now)
            _settle_job(session, job, now)
            return CANCELLED
        if row.attempts >= row.max_attempts:
            problem = {**exhausted_problem(job.id, row, unit_of(job.spec)), "type": "lease-expired"}
            _end_shard(row, FAILED, now, problem)
            _fail_job(session, job, problem, now)
            return FAILED
        row.state, row.lease_worker, row.heartbeat_at, row.updated_at = QUEUED, None, None, now
        return QUEUED

    return index.transact(work, write=True)


def touch_shard(index: Index, job_id: str, shard: int, now: datetime) -> None:
    """Bump a queued shard's ``updated_at`` (the reconciler sent its message again)."""
    stmt = (
        update(ShardRow)
        .where(ShardRow.job_id == job_id, ShardRow.shard == shard, ShardRow.state == QUEUED)
        .values(updated_at=now)
    )
    index.transact(lambda session: session.execute(stmt), write=True)


def touch_job(index: Index, job_id: str, now: datetime) -> None:
    """Bump a job's ``updated_at`` (the reconciler sent its finalize message again)."""
    stmt = update(JobRow).where(JobRow.id == job_id).values(updated_at=now)
    index.transact(lambda session: session.execute(stmt), write=True)
