"""The SQL index of jobs and chunks: the source of truth for job state (see DESIGN.md, "Job lifecycle").

Every method runs in its own short transaction (:meth:`Index.transact`), run again whole after a
transient database error (locked, busy, connection lost, read-only after a fault, a PostgreSQL
restart or failover) for the retry budget, then :class:`~storage.errors.IndexUnavailable`
(storage/index/retry.py). A write whose COMMIT landed but whose acknowledgement was lost finds its
own change on the retry (``updated_at`` is the call's time) and does not apply it twice. Methods that
change a job lock its row first (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), so concurrent API requests, redelivered Celery tasks and workers see each state change whole.

Worker-side writes are fenced on the lease: ``update_progress``, ``record_chunks``, ``finish`` and
``release`` given ``worker=`` raise :class:`~storage.errors.LeaseLost` (and change nothing) once that
worker no longer holds the job's lease. Without ``worker`` (API and admin callers) they are not fenced.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.bundle.records import ChunkRecord
from storage.errors import JobNotFound, JobStateConflict, LeaseLost
from storage.index import lifecycle
from storage.index.cursor import decode_cursor, encode_cursor
from storage.index.database import Database
from storage.index.models import ChunkRow, JobRow, format_coords, utcnow
from storage.index.records import TERMINAL_STATES, JobRecord, JobState
from storage.index.retry import retried

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000


class Index(Database):
    """Jobs and chunks in SQLite or PostgreSQL.

    ``database_url``: ``sqlite:///path/index.db`` or ``postgresql+psycopg://user@host/db``.
    ``schema`` (PostgreSQL only): keep the tables in this schema (set as the connection's
    ``search_path``; :meth:`migrate` creates it). ``?options=-csearch_path%3D<schema>`` in the URL
    does the same without creating it. The engine is created on first use and its pool is replaced
    in a forked child, so one ``Index`` can be shared with Celery prefork children. ``retry``: how
    long a transaction is retried after transient database errors (the deployable's
    ``db_retry_s``; :class:`~storage.index.database.Database`).
    """

    @staticmethod
    def _load(session: Session, job_id: str, owner: str | None, *, lock: bool = False) -> JobRow:
        stmt = select(JobRow).where(JobRow.id == job_id)
        if owner is not None:
            stmt = stmt.where(JobRow.owner == owner)
        if lock:
            stmt = stmt.with_for_update()
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise _not_found(job_id)
        return row

    # -- API side ----------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        spec: dict[str, Any],
        owner: str,
        store_url_for: Callable[[str], str],
        max_attempts: int,
        label: str | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """Insert a queued job. ``job_id`` defaults to a new UUID4 string (also the Celery task id)."""
        job_id = job_id or str(uuid.uuid4())
        if len(job_id) > 36:
            raise ValueError(f"job id {job_id!r} is longer than 36 characters")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        store_url, clock = store_url_for(job_id), _Clock()

        def work(session: Session) -> JobRecord:
            mine = session.get(JobRow, job_id) if retried(session) else None
            if mine is not None and mine.owner == owner and mine.created_at in clock.stamps:
                return mine.to_record()  # an earlier try's COMMIT landed
            row = JobRow.queued(
                job_id=job_id,
                owner=owner,
                spec=spec,
                label=label,
                max_attempts=max_attempts,
                store_url=store_url,
                now=clock.now(),
            )
            session.add(row)
            session.flush()
            return row.to_record()

        try:
            return self.transact(work, write=True)
        except IntegrityError as exc:
            raise JobStateConflict(
                f"job {job_id} already exists: submit without a job id to get a new one",
                detail={"job_id": job_id},
            ) from exc

    def get_job(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job (``owner=None``: any owner). Another owner's job raises JobNotFound, like a missing one."""
        return self.transact(lambda session: self._load(session, job_id, owner).to_record())

    def list_jobs(
        self,
        *,
        owner: str | None,
        limit: int = 50,
        cursor: str | None = None,
        state: JobState | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of jobs, newest first, and the cursor of the next page (None on the last page)."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        stmt = select(JobRow)
        if owner is not None:
            stmt = stmt.where(JobRow.owner == owner)
        if state is not None:
            stmt = stmt.where(JobRow.state == JobState(state).value)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            stmt = stmt.where(
                or_(
                    JobRow.created_at < created_at,
                    and_(JobRow.created_at == created_at, JobRow.id < last_id),
                )
            )
        stmt = stmt.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        rows = self.transact(lambda session: [row.to_record() for row in session.scalars(stmt)])
        records = rows[:limit]
        next_cursor = encode_cursor(records[-1]) if len(rows) > limit else None
        return records, next_cursor

    def request_cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Queued -> cancelled at once; running -> cancelling (the worker stops at the next chunk)."""
        clock = _Clock()

        def work(session: Session) -> JobRecord:
            row = self._load(session, job_id, owner, lock=True)
            if not clock.committed(session, row):
                lifecycle.request_cancel(row, clock.now())
            return row.to_record()

        return self.transact(work, write=True)

    # -- worker side -------------------------------------------------------------------------------

    def claim(
        self, job_id: str, worker_id: str, *, lease_timeout_s: float = lifecycle.DEFAULT_LEASE_TIMEOUT_S
    ) -> JobRecord | None:
        """Start an attempt; None means "do not run": the job is finished, cancelled or out of
        attempts, or another worker holds a lease renewed less than ``lease_timeout_s`` ago (a
        duplicate delivery; attempts are not counted). Raises JobNotFound for an unknown id.
        """
        clock = _Clock()

        def work(session: Session) -> JobRecord | None:
            row = self._load(session, job_id, None, lock=True)
            if clock.committed(session, row):  # this claim already counted its attempt
                return row.to_record() if lifecycle.holds_lease(row, worker_id) else None
            claimed = lifecycle.claim(row, worker_id, clock.now(), lease_timeout_s)
            return row.to_record() if claimed else None

        return self.transact(work, write=True)

    def release(self, job_id: str, worker: str, *, error: dict[str, Any] | None = None) -> JobState:
        """The lease holder gives the job back after a transient failure: ``queued`` (the next claim
        is the next attempt), or ``cancelled`` if a cancel was requested. ``error``: the failure's
        problem document, shown in the queued job's ``error`` until the job ends. Raises LeaseLost."""
        clock = _Clock()

        def work(session: Session) -> JobState:
            row = self._load(session, job_id, None, lock=True)
            if clock.committed(session, row):
                return JobState(row.state)
            _fence(row, worker)
            return lifecycle.release(row, clock.now(), error=error)

        return self.transact(work, write=True)

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Refresh the lease of ``worker_id``; False (logged) if another worker holds it or the job ended."""
        stmt = (
            update(JobRow)
            .where(
                JobRow.id == job_id,
                JobRow.lease_worker == worker_id,
                JobRow.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value]),
            )
            .values(heartbeat_at=utcnow())
            .returning(JobRow.id)
        )

        def work(session: Session) -> bool:
            if session.scalars(stmt).first() is not None:
                return True
            row = self._load(session, job_id, None)
            log.warning(
                "heartbeat from %s ignored: job %s is %s, lease held by %s",
                worker_id,
                job_id,
                row.state,
                row.lease_worker,
            )
            return False

        return self.transact(work, write=True)

    def update_progress(
        self,
        job_id: str,
        *,
        units_done: int | None = None,
        units_total: int | None = None,
        phase: str | None = None,
        worker: str | None = None,
        tokens_done: int | None = None,
        tokens_total: int | None = None,
    ) -> bool:
        """Record progress (and refresh the heartbeat); returns whether cancellation was requested.
        ``worker``: fenced on its lease (LeaseLost when it moved or the job ended)."""
        now = utcnow()
        values: dict[str, Any] = {"updated_at": now, "heartbeat_at": now}
        if units_done is not None:
            values["units_done"] = units_done
        if units_total is not None:
            values["units_total"] = units_total
        if phase is not None:
            values["phase"] = phase
        if tokens_done is not None:
            values["tokens_done"] = tokens_done
        if tokens_total is not None:
            values["tokens_total"] = tokens_total
        stmt = update(JobRow).where(JobRow.id == job_id)
        if worker is not None:
            stmt = stmt.where(JobRow.lease_worker == worker, JobRow.state.in_(lifecycle.LEASED_VALUES))

        def work(session: Session) -> bool:
            cancel_requested = session.scalars(
                stmt.values(**values).returning(JobRow.cancel_requested)
            ).first()
            if cancel_requested is None:
                _fence(self._load(session, job_id, None), worker)  # raises JobNotFound or LeaseLost
            return bool(cancel_requested)

        return self.transact(work, write=True)

    def is_cancel_requested(self, job_id: str) -> bool:
        stmt = select(JobRow.cancel_requested).where(JobRow.id == job_id)
        flag = self.transact(lambda session: session.scalars(stmt).one_or_none())
        if flag is None:
            raise _not_found(job_id)
        return bool(flag)

    def record_chunks(self, job_id: str, chunks: Sequence[ChunkRecord], *, worker: str | None = None) -> None:
        """Record durably written chunks (upsert on job, array, coords) and refresh the job's totals.
        ``worker``: fenced on its lease (LeaseLost, nothing recorded, when it moved or the job ended)."""
        params = chunk_params(job_id, chunks)

        def work(session: Session) -> None:  # upserts and totals recounted: safe to run twice
            _fence(self._load(session, job_id, None, lock=True), worker)
            upsert_chunks(session, job_id, params)

        self.transact(work, write=True)

    def list_chunks(self, job_id: str, array: str | None = None) -> list[ChunkRecord]:
        """Chunks recorded for the job (optionally one array), ordered by array then coords."""
        stmt = select(ChunkRow).where(ChunkRow.job_id == job_id)
        if array is not None:
            stmt = stmt.where(ChunkRow.array == array)

        def work(session: Session) -> list[ChunkRecord]:
            self._load(session, job_id, None)
            return [row.to_record() for row in session.scalars(stmt)]

        records = self.transact(work)
        # coords are stored as text ("10.0" < "2.0"), so order numerically here
        return sorted(records, key=lambda c: (c.array, c.coords))

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: dict[str, Any] | None = None,
        partial: bool = False,
        result: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> JobRecord:
        """End the job in a terminal state and release its lease.

        Raises ValueError for a non-terminal ``state`` and JobStateConflict if the job already ended;
        with ``worker``, LeaseLost when that worker no longer holds the lease (nothing changes).
        """
        state = JobState(state)
        if state not in TERMINAL_STATES:
            raise ValueError(
                f"finish() needs a terminal state (cancelled, succeeded or failed), got {state.value}"
            )
        clock = _Clock()

        def work(session: Session) -> JobRecord:
            row = self._load(session, job_id, None, lock=True)
            if clock.committed(session, row):
                return row.to_record()
            _fence(row, worker)
            lifecycle.finish(row, state, clock.now(), partial=partial, error=error, result=result)
            return row.to_record()

        return self.transact(work, write=True)


class _Clock:
    """The times one call's tries stamped on a row (read under the row's lock, so that concurrent
    writers stay in order). On a retry, a row whose ``updated_at`` is one of them was last changed
    by this call: an earlier try's COMMIT landed and only its acknowledgement was lost."""

    def __init__(self) -> None:
        self.stamps: list[datetime] = []

    def now(self) -> datetime:
        self.stamps.append(utcnow())
        return self.stamps[-1]

    def committed(self, session: Session, row: JobRow) -> bool:
        return retried(session) and row.updated_at in self.stamps


def chunk_params(job_id: str, chunks: Sequence[ChunkRecord]) -> list[dict[str, Any]]:
    """The rows of ``chunks`` for :func:`upsert_chunks` (the last record of a chunk wins)."""
    latest = {(c.array, format_coords(c.coords)): c for c in chunks}
    if any(c.nbytes < 0 for c in latest.values()):
        raise ValueError(f"job {job_id}: chunk nbytes must be >= 0")
    now = utcnow()
    return [
        {
            "job_id": job_id,
            "array": array,
            "coords": coords,
            "key": c.key,
            "nbytes": c.nbytes,
            "checksum": c.checksum,
            "created_at": now,
        }
        for (array, coords), c in latest.items()
    ]


def upsert_chunks(session: Session, job_id: str, params: list[dict[str, Any]]) -> None:
    """Upsert chunk rows (on job, array, coords) and recount the job's totals from them: safe to run
    twice. The caller fences first (the job's lease, or a shard's)."""
    if params:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        stmt = insert(ChunkRow)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ChunkRow.job_id, ChunkRow.array, ChunkRow.coords],
            set_={name: stmt.excluded[name] for name in ("key", "nbytes", "checksum")},
        )
        session.execute(stmt, params)
    of_job = ChunkRow.job_id == job_id
    session.execute(
        update(JobRow)
        .where(JobRow.id == job_id)
        .values(
            chunks_written=select(func.count()).where(of_job).scalar_subquery(),
            bytes_written=select(func.coalesce(func.sum(ChunkRow.nbytes), 0)).where(of_job).scalar_subquery(),
            updated_at=utcnow(),
        )
    )


def _fence(row: JobRow, worker: str | None) -> None:
    """Raise LeaseLost unless ``worker`` is None (not fenced) or still holds the lease of ``row``."""
    if worker is None or lifecycle.holds_lease(row, worker):
        return
    raise LeaseLost(
        f"job {row.id}: worker {worker} lost its lease (the job is {row.state}, lease held by "
        f"{row.lease_worker or 'nobody'}); this attempt stops without touching the job",
        detail={"job_id": row.id, "state": row.state, "worker": worker, "lease_worker": row.lease_worker},
    )


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(
        f"job {job_id} not found: check the id (jobs are visible to their owner only)",
        detail={"job_id": job_id},
    )
