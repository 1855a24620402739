"""Celery tasks: thin, like web views — take a job id, call a plain function, record the outcome."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery

from worker.app import EXPORT_TASK, FINALIZE_TASK, SHARD_TASK
from worker.settings import WorkerSettings


class WorkerState:
    """Per-process resources, built lazily in the pool child (never in the prefork parent)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._index: Any = None
        self._store: Any = None
        self._models: Any = None

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def resources(self) -> tuple[Any, Any, Any]:
        if self._index is None:
            from storage.index import Index
            from storage.index.retry import IndexRetry
            from storage.stores.objectstore import ObjectStore
            from worker.models import ModelCache

            self._index = Index(
                self.settings.database_url, retry=IndexRetry(budget_s=self.settings.db_retry_s)
            )
            self._store = ObjectStore.from_settings(self.settings)
            self._models = ModelCache(
                self.settings.model_cache_dir, self.settings.device, self.settings.model_root_dirs()
            )
        return self._index, self._store, self._models


def register_tasks(app: Celery, settings: WorkerSettings) -> WorkerState:
    state = WorkerState(settings)

    def queue_of(job_id: str) -> str:
        """The job's queue (storage/models/routing.py), from its stored spec."""
        from storage.models.routing import stored_job_queue

        return stored_job_queue(settings.queue_name, state.resources()[0].get_job(job_id).spec)

    @app.task(name=EXPORT_TASK, ignore_result=False)
    def export(job_id: str) -> str | None:
        from storage.index import JobState
        from worker.app import enqueue_export, enqueue_shards
        from worker.jobs import run_job

        index, store, models = state.resources()
        outcome = run_job(
            job_id,
            index=index,
            store=store,
            models=models,
            settings=settings,
            worker_id=state.worker_id,
            launch_shards=lambda job, shards: enqueue_shards(app, job, shards, queue=queue_of(job)),
        )
        if outcome is JobState.QUEUED:  # given back after a store outage: run it again later
            enqueue_export(app, job_id, queue=queue_of(job_id), countdown=settings.retry_delay_s)
        return None if outcome is None else outcome.value

    @app.task(name=SHARD_TASK, ignore_result=False)
    def shard(job_id: str, number: int) -> str | None:
        """One shard of a sharded bulk job (worker/shards.py); the chord's body finalizes the job.
        The shard that records the job's last success sends the finalize task too (a shard sent
        again by the reconciler runs outside the chord); a second finalize does nothing."""
        from worker.app import enqueue_finalize, enqueue_shard
        from worker.shards import run_shard

        index, store, models = state.resources()
        outcome = run_shard(
            job_id,
            number,
            index=index,
            store=store,
            models=models,
            settings=settings,
            worker_id=state.worker_id,
        )
        if outcome == "finalize":
            enqueue_finalize(app, job_id, queue=queue_of(job_id))
        elif outcome == "retry":
            enqueue_shard(app, job_id, number, queue=queue_of(job_id), countdown=settings.retry_delay_s)
        return outcome

    @app.task(name=FINALIZE_TASK, ignore_result=False)
    def finalize(job_id: str) -> str | None:
        from worker.shards import run_finalize

        index, store, models = state.resources()
        outcome = run_finalize(
            job_id, index=index, store=store, settings=settings, worker_id=state.worker_id, models=models
        )
        return None if outcome is None else outcome.value

    return state
