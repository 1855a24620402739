"""Run one export job against the SQL index: claim, heartbeat, export, record the outcome.

The jobs table is the source of truth: a redelivered message for a finished or cancelled job does
nothing, the attempt cap is enforced by ``Index.claim``, and cancellation is cooperative (checked
between row blocks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from storage.bundle.writer import BundleWriter
from storage.errors import JobCancelled, QkvaultError
from storage.index import Index
from storage.index.records import ChunkRecord, JobState
from storage.jobspec import JobSpec
from storage.objectstore import ObjectStore
from storage.settings import Settings
from worker.models import ModelCache

log = logging.getLogger(__name__)


class JobHooks:
    """Progress, chunk records and cancellation for one running job (throttled DB writes)."""

    def __init__(self, index: Index, job_id: str, interval_s: float) -> None:
        self.index, self.job_id, self.interval_s = index, job_id, interval_s
        self.units_done = 0
        self._last_progress = 0.0
        self._last_cancel_check = 0.0

    def phase(self, name: str, units_total: int | None = None) -> None:
        self.index.update_progress(
            self.job_id, phase=name, units_total=units_total, units_done=self.units_done
        )

    def unit_done(self) -> None:
        self.units_done += 1
        now = time.monotonic()
        if now - self._last_progress >= self.interval_s:
            self._last_progress = now
            self.index.update_progress(self.job_id, units_done=self.units_done)

    def chunks_written(self, records: Sequence[ChunkRecord]) -> None:
        self.index.record_chunks(self.job_id, records)

    def check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_check < self.interval_s:
            return
        self._last_cancel_check = now
        if self.index.is_cancel_requested(self.job_id):
            raise JobCancelled(f"job {self.job_id} was cancelled; partial data kept")


class Heartbeat:
    """Background thread renewing the job's lease every ``interval_s``."""

    def __init__(self, index: Index, job_id: str, worker_id: str, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(index, job_id, worker_id, interval_s),
            daemon=True,
            name="qkvault-heartbeat",
        )

    def _run(self, index: Index, job_id: str, worker_id: str, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                index.heartbeat(job_id, worker_id)
            except Exception:  # a missed beat is not fatal; the lease tolerates it
                log.warning("heartbeat for job %s failed", job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, QkvaultError):
        return exc.to_problem()
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return {
                "type": "out-of-memory",
                "title": "OutOfMemoryError",
                "detail": f"the worker ran out of memory: {exc}. Export fewer prompts, layers or tokens "
                "per job, or use smaller storage.chunk_rows.",
            }
    except ImportError:
        pass
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return {
            "type": "time-limit",
            "title": "SoftTimeLimitExceeded",
            "detail": "the job exceeded the worker's time limit; split it into smaller jobs",
        }
    return {"type": "internal-error", "title": type(exc).__name__, "detail": f"{type(exc).__name__}: {exc}"}


def run_job(
    job_id: str, *, index: Index, store: ObjectStore, models: ModelCache, settings: Settings, worker_id: str
) -> JobState | None:
    """Run ``job_id`` to a terminal state; returns it (``None`` when there was nothing to run)."""
    from worker.export import Exporter

    job = index.claim(job_id, worker_id)
    if job is None:
        log.info("job %s: nothing to run (finished, cancelled or out of attempts)", job_id)
        return None
    hooks = JobHooks(index, job_id, settings.progress_interval_s)
    with Heartbeat(index, job_id, worker_id, settings.heartbeat_interval_s):
        try:
            spec = JobSpec.model_validate(job.spec)
            hooks.phase("loading_model")
            loaded = models.get(spec.model)
            writer = BundleWriter(
                job.store_url, storage_options=store.storage_options, on_chunks=hooks.chunks_written
            )
            exporter = Exporter(spec, loaded, writer, hooks)
            summary = exporter.run(job_id)
        except JobCancelled:
            log.info("job %s cancelled at a chunk boundary", job_id)
            index.finish(job_id, JobState.CANCELLED, partial=True)
            return JobState.CANCELLED
        except Exception as exc:
            log.exception("job %s failed", job_id)
            written = index.get_job(job_id).chunks_written
            index.finish(job_id, JobState.FAILED, error=_failure(exc), partial=written > 0)
            return JobState.FAILED
    index.update_progress(job_id, units_done=hooks.units_done, units_total=hooks.units_done, phase="done")
    index.finish(job_id, JobState.SUCCEEDED, result=summary)
    return JobState.SUCCEEDED
