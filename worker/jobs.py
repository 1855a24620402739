"""Run one export job against the SQL index: claim, heartbeat, export, record the outcome.

The jobs table is the source of truth: a redelivered message for a finished or cancelled job, or
for a job another live worker holds, does nothing; the attempt cap is enforced by ``Index.claim``,
and cancellation is cooperative (checked between row blocks). Every write of the attempt is fenced
on its lease: once the lease moved (the worker stalled past ``lease_timeout_s`` and the job was
requeued) or the job ended, the index raises LeaseLost and the attempt stops without touching the
job. A retried attempt resumes by chunk (storage/bundle/resume.py). An object store that stays
down past ``store_retry_s``, or a store that refuses writes for a reason an operator can fix (disk
full, read-only, permission denied), gives the job back (queued again, the problem shown in its
``error`` with ``retrying: true``) while attempts are left. The index retries transient database
errors itself for ``db_retry_s``; past that a claim is sent again later and an attempt gives the job
back, or leaves it to its lease when the index still does not answer: never ``failed`` for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from storage.bundle.resume import ResumeSet
from storage.bundle.writer import BundleWriter
from storage.errors import (
    EncoderProcessDied,
    IndexUnavailable,
    JobCancelled,
    LeaseLost,
    QkvaultError,
    StoreNotWritable,
    StoreUnavailable,
)
from storage.index import Index
from storage.index.records import JobRecord, JobState
from storage.jobs.spec import JobSpec
from storage.sources.rows import SourceContext
from storage.stores.objectstore import ObjectStore
from worker.models import ModelCache
from worker.reporting import JobReporter, ReportIntervals
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Failures a later attempt may not meet: the job is given back while attempts are left
GIVEN_BACK: tuple[type[Exception], ...] = (StoreUnavailable, StoreNotWritable, EncoderProcessDied)


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
    launch_shards: Callable[[str, list[int]], None] | None = None,
) -> JobState | None:
    """Run ``job_id``; returns the state it left the job in: terminal, ``queued`` (given back after
    a store or database outage, or not claimed because the index stayed unavailable: send it again
    after ``settings.retry_delay_s``), or ``None`` when there was nothing to run or the lease was
    lost (another attempt, or the reconciler, owns the job). ``launch_shards(job_id, shards)``:
    sends the shards of a bulk job split over workers (worker/shards.py; ``settings.
    shard_micro_batches``), which then stays ``running`` under its shards' leases; None: every job
    runs here."""
    try:  # retried for settings.db_retry_s (storage/index/retry.py)
        job = index.claim(job_id, worker_id, lease_timeout_s=settings.lease_timeout_s)
    except IndexUnavailable as exc:
        log.warning("job %s: not claimed, %s; sent again in %g s", job_id, exc, settings.retry_delay_s)
        return JobState.QUEUED
    if job is None:
        log.info(
            "job %s: nothing to run (finished, cancelled, out of attempts, or running elsewhere)", job_id
        )
        return None
    try:
        return _attempt(
            job,
            index=index,
            store=store,
            models=models,
            settings=settings,
            worker_id=worker_id,
            launch_shards=launch_shards,
        )
    except LeaseLost as exc:
        log.warning("job %s: stopped, lease lost: %s", job_id, exc)
        return None
    except IndexUnavailable as exc:
        return _index_unavailable(job, exc, index, worker_id)


def _index_unavailable(
    job: JobRecord, exc: IndexUnavailable, index: Index, worker_id: str
) -> JobState | None:
    """The index stayed unavailable past ``db_retry_s`` during the attempt: give the job back
    (``queued``; the next attempt resumes by chunk) if the index answers now, else leave it to the
    reconciler (the lease expires, the job is queued again)."""
    log.warning(
        "job %s: attempt %d of %d: %s; giving the job back", job.id, job.attempts, job.max_attempts, exc
    )
    problem = {**exc.to_problem(), "attempts": job.attempts, "max_attempts": job.max_attempts}
    try:
        return index.release(
            job.id, worker_id, error={**problem, "retrying": job.attempts < job.max_attempts}
        )
    except (IndexUnavailable, LeaseLost) as again:
        log.warning("job %s: not given back (%s); its lease will expire", job.id, again)
        return None


def _attempt(
    job: JobRecord,
    *,
    index: Index,
    store: ObjectStore,
    models: ModelCache,
    settings: WorkerSettings,
    worker_id: str,
    launch_shards: Callable[[str, list[int]], None] | None = None,
) -> JobState:
    job_id = job.id
    intervals = ReportIntervals(
        heartbeat_interval_s=settings.heartbeat_interval_s,
        progress_interval_s=settings.progress_interval_s,
        record_interval_s=settings.record_interval_s,
    )
    resume: ResumeSet | None = None
    with JobReporter(index, job_id, worker_id, intervals) as reporter:
        try:
            from worker.export import Exporter  # torch: imported while the lease is being renewed

            spec = JobSpec.model_validate(job.spec)
            reporter.phase("loading_model")
            loaded = models.get(spec.model)
            if job.attempts > 1:  # an earlier attempt died: keep what it stored and recorded
                resume = ResumeSet.from_records(index.list_chunks(job_id))
                log.info(
                    "job %s: attempt %d resumes over %d recorded chunks", job_id, job.attempts, len(resume)
                )
            writer_options = settings.writer_options(
                storage_options=store.storage_options, on_chunk=reporter.chunk_stored, resume=resume
            )
            if spec.bulk:  # sequences from a source, in micro-batches (worker/bulk.py)
                from worker.bulk import BulkExporter, JobLimits

                context = SourceContext(store=store, datasets_dir=settings.datasets_dir, owner=job.owner)
                if launch_shards is not None and settings.shard_micro_batches > 0:
                    from worker.shards import start_sharded

                    shards = start_sharded(
                        job,
                        spec,
                        loaded,
                        reporter,
                        index=index,
                        settings=settings,
                        context=context,
                        writer_options=writer_options,
                        worker_id=worker_id,
                    )
                    if shards is not None:  # the job's lease passed to its shards
                        launch_shards(job_id, shards)
                        return JobState.RUNNING
                bulk = BulkExporter(
                    spec,
                    loaded,
                    reporter,
                    bundle_url=job.store_url,
                    writer_options=writer_options,
                    context=context,
                    limits=JobLimits(settings.max_sequences, settings.max_job_tokens),
                    on_tokens=reporter.tokens,
                    records_written=reporter.records_written,
                )
                summary = bulk.run(job_id)
            else:
                writer = BundleWriter(job.store_url, **writer_options)
                exporter = Exporter(spec, loaded, writer, reporter)
                if launch_shards is not None and settings.shard_layers > 0:
                    from worker.shards import start_layer_sharded

                    shards = start_layer_sharded(
                        job, exporter, reporter, index=index, settings=settings, worker_id=worker_id
                    )
                    if shards is not None:  # the job's lease passed to its shards
                        writer.close()
                        launch_shards(job_id, shards)
                        return JobState.RUNNING
                summary = exporter.run(job_id)
                # where the writer's time went (thread-seconds per pool, bytes in and out)
                summary["writer"] = writer.pipeline_stats.to_dict()
                log.info("job %s: chunk writer %s", job_id, summary["writer"])
        except JobCancelled:
            log.info("job %s cancelled at a chunk boundary", job_id)
            reporter.flush()
            index.finish(job_id, JobState.CANCELLED, partial=True, worker=worker_id)
            return JobState.CANCELLED
        except (LeaseLost, IndexUnavailable):
            raise  # the job is not failed for a database outage: run_job gives it back
        except Exception as exc:
            _flush_quietly(reporter)
            return _failed(job, exc, index, worker_id)
    if resume is not None:
        summary = {**summary, "resume": {"attempt": job.attempts, **resume.stats.as_dict()}}
        log.info("job %s: resumed: %s", job_id, resume.stats.as_dict())
    reporter.flush()
    tokens = reporter.tokens_done or None  # a bulk job's: now exact
    index.update_progress(
        job_id,
        units_done=reporter.units_done,
        units_total=reporter.units_done,
        phase="done",
        worker=worker_id,
        tokens_done=tokens,
        tokens_total=tokens,
    )
    index.finish(job_id, JobState.SUCCEEDED, result=summary, worker=worker_id)
    return JobState.SUCCEEDED


def _flush_quietly(reporter: JobReporter) -> None:
    """Record what a failed attempt stored (a retried attempt resumes over it), unless the index is
    the problem."""
    try:
        reporter.flush()
    except LeaseLost:
        raise
    except Exception:
        log.warning("job %s: chunk records of the failed attempt not written", reporter.job_id, exc_info=True)


def _failed(job: JobRecord, exc: Exception, index: Index, worker_id: str) -> JobState:
    """A failed attempt. A store outage, a store an operator must fix or a chunk encoder process
    that died (:data:`GIVEN_BACK`) with attempts left gives the job back: ``queued``, its problem
    document in the job's ``error`` with ``"retrying": true`` until the job ends. Anything else, or
    the last attempt: ``failed``."""
    problem = {**_failure(exc), "attempts": job.attempts, "max_attempts": job.max_attempts}
    if isinstance(exc, GIVEN_BACK) and job.attempts < job.max_attempts:
        log.warning(
            "job %s: attempt %d of %d: %s; giving the job back", job.id, job.attempts, job.max_attempts, exc
        )
        return index.release(job.id, worker_id, error={**problem, "retrying": True})
    log.exception("job %s failed", job.id)
    if isinstance(exc, GIVEN_BACK):
        problem["detail"] = (
            f"{problem['detail']} (attempt {job.attempts} of {job.max_attempts}, none left: "
            "submit the job again once this is fixed)"
        )
    written = index.get_job(job.id).chunks_written
    index.finish(job.id, JobState.FAILED, error=problem, partial=written > 0, worker=worker_id)
    return JobState.FAILED
