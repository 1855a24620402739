"""Celery application factory. Imports neither torch nor transformers (the API uses it to enqueue).

Settings that matter for long GPU jobs (see DESIGN.md "Job lifecycle"): late acks, prefetch 1,
soft < hard time limit < Redis visibility timeout (broker and result backend), concurrency 1 per
GPU, CUDA initialised only in the child process (models load lazily inside the task).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from storage.settings import ServiceSettings

EXPORT_TASK = "qkvault.export"


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


def revoke_export(app: Celery, job_id: str) -> None:
    """Revoke a still-queued export (a running one stops cooperatively at its next chunk)."""
    app.control.revoke(job_id)
