"""Run one export job against the SQL index: claim, heartbeat, export, record the outcome.

The jobs table is the source of truth: a redelivered message for a finished or cancelled job, or
for a job another live worker holds, does nothing; the attempt cap is enforced by ``Index.claim``,
and cancellation is cooperative (checked between row blocks). Every write of the attempt is fenced
on its lease: once the lease moved (the worker stalled past ``lease_timeout_s`` and the job was
requeued) or the job ended, the index raises LeaseLost and the attempt stops without touching the
job. A retried attempt resumes by chunk (storage/bundle/resume.py). An object store that stays
down past ``store_retry_s`` gives the job back (queued again) while attempts are left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from storage.bundle.resume import ResumeSet
from storage.bundle.writer import BundleWriter
from storage.errors import JobCancelled, LeaseLost, QkvaultError, StoreUnavailable
from storage.index import Index
from storage.index.records import ChunkRecord, JobRecord, JobState
from storage.jobspec import JobSpec
from storage.objectstore import ObjectStore, StoreRetry
from worker.models import ModelCache
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class JobHooks:
    """Progress, chunk records and cancellation for one running job (throttled DB writes), fenced
    on ``worker_id``'s lease: LeaseLost once it moved or the job ended."""

    def __init__(self, index: Index, job_id: str, interval_s: float, worker_id: str) -> None:
        self.index, self.job_id, self.interval_s, self.worker_id = index, job_id, interval_s, worker_id
        self.units_done = 0
        self.lease_lost = threading.Event()  # set by the heartbeat thread
        self.cancel_requested = threading.Event()  # kept fresh by the heartbeat thread
        self._last_progress = 0.0

    def phase(self, name: str, units_total: int | None = None) -> None:
        self.index.update_progress(
            self.job_id,
            phase=name,
            units_total=units_total,
            units_done=self.units_done,
            worker=self.worker_id,
        )

    def unit_done(self) -> None:
        self.units_done += 1
        now = time.monotonic()
        if now - self._last_progress >= self.interval_s:
            self._last_progress = now
            self.index.update_progress(self.job_id, units_done=self.units_done, worker=self.worker_id)

    def chunks_written(self, records: Sequence[ChunkRecord]) -> None:
        self.index.record_chunks(self.job_id, records, worker=self.worker_id)

    def check_cancelled(self) -> None:
        """Called by the export between row blocks and decoding steps, on the forward thread: reads
        two flags the heartbeat thread keeps fresh, never the database."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id}: the heartbeat of {self.worker_id} was refused (lease lost)")
        if self.cancel_requested.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled; partial data kept")


class Heartbeat:
    """Background thread renewing the job's lease every ``interval_s`` and reading the job's cancel
    request every ``cancel_poll_s`` (into ``cancelled``), so the forward thread never waits on SQL."""

    def __init__(
        self,
        index: Index,
        job_id: str,
        worker_id: str,
        interval_s: float,
        lost: threading.Event | None = None,
        *,
        cancelled: threading.Event | None = None,
        cancel_poll_s: float | None = None,
    ) -> None:
        self._stop = threading.Event()
        self.lost = lost or threading.Event()  # set when the index refuses a beat (lease moved, job ended)
        self.cancelled = cancelled or threading.Event()  # set once a cancel was requested
        self._poll_s = min(interval_s, cancel_poll_s or interval_s)
        self._thread = threading.Thread(
            target=self._run,
            args=(index, job_id, worker_id, interval_s),
            daemon=True,
            name="qkvault-heartbeat",
        )

    def _run(self, index: Index, job_id: str, worker_id: str, interval_s: float) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self._poll_s):
            try:
                if not self.cancelled.is_set() and index.is_cancel_requested(job_id):
                    self.cancelled.set()
                if time.monotonic() - last_beat >= interval_s:
                    last_beat = time.monotonic()
                    if not index.heartbeat(job_id, worker_id):
                        self.lost.set()
                        return
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
    job_id: str,
    *,
    index: Index,
    store: ObjectStore,
    models: ModelCache,
    settings: WorkerSettings,
    worker_id: str,
) -> JobState | None:
    """Run ``job_id``; returns the state it left the job in: terminal, ``queued`` (given back after
    a store outage: send it again after ``settings.retry_delay_s``), or ``None`` when there was
    nothing to run or the lease was lost (another attempt, or the reconciler, owns the job)."""
    job = index.claim(job_id, worker_id, lease_timeout_s=settings.lease_timeout_s)
    if job is None:
        log.info(
            "job %s: nothing to run (finished, cancelled, out of attempts, or running elsewhere)", job_id
        )
        return None
    try:
        return _attempt(job, index=index, store=store, models=models, settings=settings, worker_id=worker_id)
    except LeaseLost as exc:
        log.warning("job %s: stopped, lease lost: %s", job_id, exc)
        return None


def _attempt(
    job: JobRecord,
    *,
    index: Index,
    store: ObjectStore,
    models: ModelCache,
    settings: WorkerSettings,
    worker_id: str,
) -> JobState:
    job_id = job.id
    hooks = JobHooks(index, job_id, settings.progress_interval_s, worker_id)
    resume: ResumeSet | None = None
    with Heartbeat(
        index,
        job_id,
        worker_id,
        settings.heartbeat_interval_s,
        hooks.lease_lost,
        cancelled=hooks.cancel_requested,
        cancel_poll_s=settings.progress_interval_s,
    ):
        try:
            from worker.export import Exporter  # torch: imported while the lease is being renewed

            spec = JobSpec.model_validate(job.spec)
            hooks.phase("loading_model")
            loaded = models.get(spec.model)
            if job.attempts > 1:  # an earlier attempt died: keep what it stored and recorded
                resume = ResumeSet.from_records(index.list_chunks(job_id))
                log.info(
                    "job %s: attempt %d resumes over %d recorded chunks", job_id, job.attempts, len(resume)
                )
            writer = BundleWriter(
                job.store_url,
                storage_options=store.storage_options,
                on_chunks=hooks.chunks_written,
                resume=resume,
                retry=StoreRetry(deadline_s=settings.store_retry_s),
                write_threads=settings.write_threads or None,
                record_interval_s=settings.record_interval_s,
                checksum_algorithm=settings.chunk_checksum,
            )
            exporter = Exporter(spec, loaded, writer, hooks)
            summary = exporter.run(job_id)
            # where the writer's time went (thread-seconds per pool, bytes in and out)
            summary["writer"] = writer.pipeline_stats.to_dict()
            log.info("job %s: chunk writer %s", job_id, summary["writer"])
        except JobCancelled:
            log.info("job %s cancelled at a chunk boundary", job_id)
            index.finish(job_id, JobState.CANCELLED, partial=True, worker=worker_id)
            return JobState.CANCELLED
        except LeaseLost:
            raise
        except Exception as exc:
            return _failed(job, exc, index, worker_id)
    if resume is not None:
        summary = {**summary, "resume": {"attempt": job.attempts, **resume.stats.as_dict()}}
        log.info("job %s: resumed: %s", job_id, resume.stats.as_dict())
    index.update_progress(
        job_id, units_done=hooks.units_done, units_total=hooks.units_done, phase="done", worker=worker_id
    )
    index.finish(job_id, JobState.SUCCEEDED, result=summary, worker=worker_id)
    return JobState.SUCCEEDED


def _failed(job: JobRecord, exc: Exception, index: Index, worker_id: str) -> JobState:
    """A failed attempt: a store outage with attempts left gives the job back; else ``failed``."""
    if isinstance(exc, StoreUnavailable) and job.attempts < job.max_attempts:
        log.warning(
            "job %s: attempt %d of %d: %s; giving the job back", job.id, job.attempts, job.max_attempts, exc
        )
        return index.release(job.id, worker_id)
    log.exception("job %s failed", job.id)
    problem = {**_failure(exc), "attempts": job.attempts, "max_attempts": job.max_attempts}
    written = index.get_job(job.id).chunks_written
    index.finish(job.id, JobState.FAILED, error=problem, partial=written > 0, worker=worker_id)
    return JobState.FAILED
