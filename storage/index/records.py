"""Plain value types of the SQL index: job states and the immutable records it hands out.

No SQLAlchemy here: the API and the worker pass these around without touching a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.jobs.fields import COMPUTED_FIELDS, TERMINAL_STATES, JobFields, JobState, Progress

__all__ = ["TERMINAL_STATES", "JobRecord", "JobState"]


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``. Every datetime is timezone-aware UTC.

    A field here is copied by name from the ``JobRow`` column of the same name
    (:meth:`storage.index.models.JobRow.to_record`), and, when :class:`storage.jobs.fields.JobFields`
    declares it, on to the public job document (:meth:`public_fields`). A new field: see
    :mod:`storage.jobs.fields`.
    """

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
    tokens_done: int  # a bulk job's real tokens (prompt + new) of its finished micro-batches
    tokens_total: int  # ... expected: the estimate at submission, exact once the job ends
    bytes_written: int
    chunks_written: int
    error: dict[str, Any] | None  # problem document {"type", "title", "detail", ...}
    store_url: str
    partial: bool
    result: dict[str, Any] | None  # small summary written when the job ends

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def progress(self) -> Progress:
        total = self.units_total or 0
        if total > 0:
            fraction: float | None = min(1.0, max(0.0, self.units_done / total))
        else:
            fraction = 1.0 if self.state == JobState.SUCCEEDED else None
        return Progress(
            units_done=self.units_done,
            units_total=total,
            fraction=fraction,
            tokens_done=self.tokens_done,
            tokens_total=self.tokens_total,
            bytes_written=self.bytes_written,
            chunks_written=self.chunks_written,
        )

    def public_fields(self) -> dict[str, Any]:
        """The fields of :class:`~storage.jobs.fields.JobFields` this record provides: each declared
        field copied from the record field of the same name, and ``progress`` computed. ``links``
        are left to the API; the stored ``spec`` is handed back as stored (see
        :func:`storage.jobs.spec.stored_spec` for a lenient read)."""
        values = {name: getattr(self, name) for name in JobFields.model_fields if name not in COMPUTED_FIELDS}
        values["progress"] = self.progress()
        return values
