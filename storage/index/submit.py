"""Job submission with an Idempotency-Key and a per-owner limit of jobs in flight.

One write transaction per submission: (PostgreSQL) an advisory lock on the owner, so concurrent
submissions of one owner queue behind each other; (SQLite) ``BEGIN IMMEDIATE`` does the same for
the whole database. Inside it: a job of this owner with the same ``idempotency_key`` is returned
as is (or refused when its request differed), else the owner's jobs in flight are counted against
the limit, else the new job is inserted. The unique index on ``(owner, idempotency_key)`` backs
this up: a duplicate that slipped past (another writer, a different lock) is an IntegrityError, and
the job that won is returned. The transaction is retried whole after a transient database error
(``Index.transact``); a retry after a COMMIT whose acknowledgement was lost finds the job it
inserted (its fresh id) and answers as the first try would have (``created=True``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import QkvaultError
from storage.index.models import JobRow, utcnow
from storage.index.records import JobRecord, JobState
from storage.index.repo import Index
from storage.index.retry import retried

IN_FLIGHT_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.CANCELLING.value)
_PG_OWNER_LOCK_SPACE = 0x716B7375  # "qksu": first key of pg_advisory_xact_lock(int, int)


class IdempotencyKeyReused(QkvaultError, ValueError):
    """The Idempotency-Key was used before by this owner with a different request."""

    problem_type = "idempotency-key-reused"
    status = 422


class TooManyJobsInFlight(QkvaultError, RuntimeError):
    problem_type = "too-many-jobs-in-flight"
    status = 429


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: an earlier submission with the same Idempotency-Key


def request_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a (validated, normalised) spec: same job -> same hash."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _lock_owner(session: Session, owner: str) -> None:
    """PostgreSQL: queue this owner's submissions behind each other (SQLite: BEGIN IMMEDIATE did)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:space AS integer), CAST(:owner AS integer))"),
            {"space": _PG_OWNER_LOCK_SPACE, "owner": zlib.crc32(owner.encode()) - (1 << 31)},
        )


def _existing(session: Session, owner: str, key: str) -> JobRow | None:
    stmt = select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key)
    return session.scalars(stmt).one_or_none()


def _replay(row: JobRow, key: str, digest: str) -> Submitted:
    if row.request_hash != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used for job {row.id} with a different job spec; "
            "send a new Idempotency-Key for a different job, or resend exactly the same spec to get "
            f"job {row.id} back",
            detail={"job_id": row.id, "idempotency_key": key},
        )
    return Submitted(row.to_record(), created=False)


def jobs_in_flight(index: Index, owner: str) -> int:
    """The owner's jobs that are queued, running or cancelling."""
    stmt = select(func.count()).where(JobRow.owner == owner, JobRow.state.in_(IN_FLIGHT_STATES))
    return int(index.transact(lambda session: session.scalar(stmt)) or 0)


def submit_job(
    index: Index,
    *,
    spec: dict[str, Any],
    owner: str,
    store_url_for: Callable[[str], str],
    max_attempts: int,
    label: str | None = None,
    idempotency_key: str | None = None,
    max_in_flight: int = 0,
    tokens_total: int = 0,
) -> Submitted:
    """Insert a queued job for ``owner`` unless ``idempotency_key`` names an earlier one.

    ``max_in_flight`` > 0 caps the owner's queued + running + cancelling jobs (TooManyJobsInFlight);
    a replayed submission is never refused by the cap. A key reused with another spec raises
    IdempotencyKeyReused. ``tokens_total``: a bulk job's tokens as admission estimated them.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    digest = request_hash(spec)
    job_id = str(uuid.uuid4())
    store_url = store_url_for(job_id)

    def work(session: Session) -> Submitted:
        _lock_owner(session, owner)
        if retried(session) and (mine := session.get(JobRow, job_id)) is not None:
            return Submitted(mine.to_record(), created=True)  # the first try's COMMIT landed
        if idempotency_key is not None and (row := _existing(session, owner, idempotency_key)):
            return _replay(row, idempotency_key, digest)
        if max_in_flight > 0:
            count = session.scalar(
                select(func.count()).where(JobRow.owner == owner, JobRow.state.in_(IN_FLIGHT_STATES))
            )
            if int(count or 0) >= max_in_flight:
                raise TooManyJobsInFlight(
                    f"{owner} has {count} jobs queued or running, the limit of this server "
                    f"(QKVAULT_MAX_JOBS_IN_FLIGHT={max_in_flight}); wait until one finishes "
                    "(GET /v1/jobs?state=running) or cancel one (POST /v1/jobs/{id}/cancel), "
                    "then submit again",
                    detail={"limit": max_in_flight, "in_flight": int(count or 0)},
                )
        row = JobRow.queued(
            job_id=job_id,
            owner=owner,
            spec=spec,
            label=label,
            max_attempts=max_attempts,
            store_url=store_url,
            now=utcnow(),
            tokens_total=tokens_total,
        )
        row.idempotency_key = idempotency_key
        row.request_hash = digest
        session.add(row)
        session.flush()
        return Submitted(row.to_record(), created=True)

    try:
        return index.transact(work, write=True)
    except IntegrityError:
        if idempotency_key is None:
            raise
    key = idempotency_key

    def replay(session: Session) -> Submitted:
        # a concurrent submission with the same key won the unique index: hand back its job
        row = _existing(session, owner, key)
        if row is None:
            raise RuntimeError(f"job with Idempotency-Key {key!r} vanished after a conflict")
        return _replay(row, key, digest)

    return index.transact(replay)
