"""Plain value types of the SQL index: job states and the immutable records it hands out.

No SQLAlchemy here: the API and the worker pass these around without touching a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.CANCELLED, JobState.SUCCEEDED, JobState.FAILED})


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``. Every datetime is timezone-aware UTC."""

    id: str
    owner: str
    state: JobState
    spec: dict[str, Any]
    label: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    lease_worker: str | None
    heartbeat_at: datetime | None
    cancel_requested: bool
    phase: str | None  # e.g. "loading_model", "prefill", "decoding", "finalizing"
    units_done: int
    units_total: int
    bytes_written: int
    chunks_written: int
    error: dict[str, Any] | None  # problem document {"type", "title", "detail", ...}
    store_url: str
    partial: bool
    result: dict[str, Any] | None  # small summary written when the job ends

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class ChunkRecord:
    """One durably written chunk of a bundle."""

    array: str  # e.g. "attention", "q", "tokens"
    coords: tuple[int, ...]  # chunk grid coordinates
    key: str  # store key relative to the bundle root, e.g. "attention/c/0/1/0/2/0"
    nbytes: int  # stored (encoded) size
    checksum: str  # "crc32c:<hex>" or "sha256:<hex>" of the stored bytes (storage/bundle/checksum.py)
