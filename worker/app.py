"""Celery application factory. Imports neither torch nor transformers (the API uses it to enqueue).

Settings that matter for long GPU jobs (see DESIGN.md "Job lifecycle"): late acks, prefetch 1,
soft < hard time limit < Redis visibility timeout (broker and result backend), concurrency 1 per
GPU, CUDA initialised only in the child process (models load lazily inside the task).
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from celery import Celery

from storage.settings import ServiceSettings

EXPORT_TASK = "qkvault.export"
SHARD_TASK = "qkvault.shard"  # one shard of a sharded bulk job (worker/shards.py)
FINALIZE_TASK = "qkvault.finalize"  # a sharded job's sequence table and root metadata


def create_celery_app(settings: ServiceSettings) -> Celery:
    if not (
        settings.task_soft_time_limit_s
        < settings.task_hard_time_limit_s
        < settings.broker_visibility_timeout_s
    ):
        raise ValueError(
            "time limits must satisfy soft < hard < visibility timeout; got "
            f"{settings.task_soft_time_limit_s} / {settings.task_hard_time_limit_s} / "
            f"{settings.broker_visibility_timeout_s} s: raise QKVAULT_BROKER_VISIBILITY_TIMEOUT_S"
        )
    app = Celery("qkvault", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": settings.broker_visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # redelivered; the attempt cap lives in the jobs table
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_hard_time_limit_s,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        task_track_started=True,
        result_extended=True,  # a task's result names the worker that ran it and the queue it came from
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def enqueue_export(
    app: Celery, job_id: str, queue: str | None = None, countdown: float | None = None
) -> None:
    """Send the export task by name; the job id is also the Celery task id. ``countdown``: run it
    no sooner than that many seconds from now."""
    app.send_task(
        EXPORT_TASK,
        args=[job_id],
        task_id=job_id,
        queue=queue or app.conf.task_default_queue,
        countdown=countdown,
    )


def shard_key(job_id: str, shard: int) -> str:
    """What names a shard's messages: their task ids are ``<key>:<8 hex>``, a new one per send."""
    return f"{job_id}:shard:{shard}"


def enqueue_shards(app: Celery, job_id: str, shards: list[int], queue: str | None = None) -> None:
    """Send a sharded job's shard tasks as a chord whose body finalizes the job (every shard
    recorded done); with no shard left to run, only the finalize task."""
    from celery import chord, group

    queue = queue or app.conf.task_default_queue
    finalize = app.signature(
        FINALIZE_TASK,
        args=[job_id],
        queue=queue,
        immutable=True,
        task_id=f"{job_id}:finalize:{uuid4().hex[:8]}",
    )
    if not shards:
        finalize.apply_async()
        return
    header = [
        app.signature(
            SHARD_TASK, args=[job_id, n], queue=queue, task_id=f"{shard_key(job_id, n)}:{uuid4().hex[:8]}"
        )
        for n in shards
    ]
    chord(group(header, app=app), app=app)(finalize)


def enqueue_shard(
    app: Celery, job_id: str, shard: int, queue: str | None = None, countdown: float | None = None
) -> None:
    """Send one shard task again, outside its chord (the reconciler, a shard given back): the shard
    that records the job's last success sends the finalize task itself."""
    app.send_task(
        SHARD_TASK,
        args=[job_id, shard],
        task_id=f"{shard_key(job_id, shard)}:{uuid4().hex[:8]}",
        queue=queue or app.conf.task_default_queue,
        countdown=countdown,
    )


def enqueue_finalize(app: Celery, job_id: str, queue: str | None = None) -> None:
    app.send_task(
        FINALIZE_TASK,
        args=[job_id],
        task_id=f"{job_id}:finalize:{uuid4().hex[:8]}",
        queue=queue or app.conf.task_default_queue,
    )


def revoke_export(app: Celery, job_id: str) -> None:
    """Revoke a still-queued export (a running one stops cooperatively at its next chunk)."""
    app.control.revoke(job_id)
