"""ORM tables of the SQL index (``jobs``, ``chunks``, ``api_keys``, ``job_shards``).

The hand-written migrations ``migrations/versions/0001_initial.py`` and ``0002_api_keys_idempotency.py``
create exactly these tables; ``tests/storage/test_index.py`` checks that the two agree, and that every
``JobRecord`` field has a ``jobs`` column of the same name (``JobRow.to_record`` copies them by name).
Where a new job field goes: :mod:`storage.jobs.fields`.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.bundle.records import ChunkRecord
from storage.index.records import JobRecord, JobState

JOB_RECORD_FIELDS = tuple(f.name for f in fields(JobRecord))

# Stable constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The CHECK on jobs.state; a new state needs a migration that rewrites it.
STATE_CHECK = "state IN ({})".format(", ".join(f"'{s.value}'" for s in JobState))
SHARD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")  # job_shards.state
SHARD_STATE_CHECK = "state IN ({})".format(", ".join(f"'{s}'" for s in SHARD_STATES))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    SQLite stores no zone and returns naive values; they are UTC because every bound value is
    converted to UTC first. A naive value bound from Python is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012  (SQLAlchemy reads a plain dict)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(none_as_null=True),  # None -> SQL NULL, not JSON null
    }


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(STATE_CHECK, name="state"),
        Index("ix_jobs_owner_created_at", "owner", "created_at"),
        # Idempotency-Key of POST /v1/jobs, scoped per owner (NULLs never collide)
        Index("uq_jobs_owner_idempotency_key", "owner", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    label: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    phase: Mapped[str | None] = mapped_column(String(64))
    units_done: Mapped[int] = mapped_column(BigInteger)
    units_total: Mapped[int] = mapped_column(BigInteger)
    tokens_done: Mapped[int] = mapped_column(BigInteger, server_default="0")
    tokens_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    bytes_written: Mapped[int] = mapped_column(BigInteger)
    chunks_written: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None]
    store_url: Mapped[str] = mapped_column(String(2048))
    partial: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the normalised spec

    @classmethod
    def queued(
        cls,
        *,
        job_id: str,
        owner: str,
        spec: dict[str, Any],
        label: str | None,
        max_attempts: int,
        store_url: str,
        now: datetime,
        tokens_total: int = 0,
    ) -> JobRow:
        """A new job in state ``queued`` with zeroed counters."""
        return cls(
            id=job_id,
            owner=owner,
            state=JobState.QUEUED.value,
            spec=dict(spec),
            label=label,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            attempts=0,
            max_attempts=max_attempts,
            lease_worker=None,
            heartbeat_at=None,
            cancel_requested=False,
            phase=None,
            units_done=0,
            units_total=0,
            tokens_done=0,
            tokens_total=tokens_total,
            bytes_written=0,
            chunks_written=0,
            error=None,
            store_url=store_url,
            partial=False,
            result=None,
        )

    def to_record(self) -> JobRecord:
        """The record of this row: every ``JobRecord`` field copied from the column of the same name
        (JSON columns as fresh dicts, so the record shares nothing with the session)."""
        values = {name: getattr(self, name) for name in JOB_RECORD_FIELDS}
        values = {name: dict(v) if isinstance(v, dict) else v for name, v in values.items()}
        return JobRecord(**{**values, "state": JobState(self.state)})


class ChunkRow(Base):
    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("job_id", "array", "coords"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    array: Mapped[str] = mapped_column(String(255))
    coords: Mapped[str] = mapped_column(String(255))  # "0.1.0"; "" for a 0-d array
    key: Mapped[str] = mapped_column(String(1024))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(160))
    created_at: Mapped[datetime]

    def to_record(self) -> ChunkRecord:
        return ChunkRecord(
            array=self.array,
            coords=parse_coords(self.coords),
            key=self.key,
            nbytes=self.nbytes,
            checksum=self.checksum,
        )


class ApiKeyRow(Base):
    """An API key: only the sha256 of the secret is stored (storage/index/apikeys.py)."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    admin: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str | None] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole secret
    prefix: Mapped[str] = mapped_column(String(16))  # first characters of the secret, to recognise it
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ShardRow(Base):
    """One shard of a sharded bulk job: a range of its micro-batches, run by any worker
    (storage/index/shards.py). Its lease, attempts and progress are its own; the job's progress is
    the sum over its shards."""

    __tablename__ = "job_shards"
    __table_args__ = (CheckConstraint(SHARD_STATE_CHECK, name="state"),)

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    first_window: Mapped[int] = mapped_column(Integer)  # planning window of the first micro-batch
    window_first_batch: Mapped[int] = mapped_column(Integer)  # micro-batch index where that window starts
    first_batch: Mapped[int] = mapped_column(Integer)
    batches: Mapped[int] = mapped_column(Integer)
    units_total: Mapped[int] = mapped_column(BigInteger)  # sequences of its micro-batches
    units_done: Mapped[int] = mapped_column(BigInteger)
    tokens_planned: Mapped[int] = mapped_column(BigInteger)  # prompt + max_new_tokens, planned
    padded_tokens: Mapped[int] = mapped_column(BigInteger)
    tokens_done: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_worker: Mapped[str | None] = mapped_column(String(255))
    last_worker: Mapped[str | None] = mapped_column(String(255))  # who ran (or runs) it last
    heartbeat_at: Mapped[datetime | None]
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


def format_coords(coords: tuple[int, ...]) -> str:
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in coords):
        raise ValueError(f"chunk coords must be non-negative integers, got {coords!r}")
    return ".".join(str(c) for c in coords)


def parse_coords(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(".")) if text else ()
