"""Process faults with the real processes: ``python -m worker`` (Celery, prefork) and
``python -m worker.reconciler`` on real Redis, a SQLite index and a local store (docs/reliability.md).

- the worker is SIGKILLed (parent and pool child) mid-job, repeatedly, at different points;
- Redis (AOF on, as in docker-compose.yml) is SIGKILLed and restarted with jobs queued and one running;
- a job is cancelled while it runs, while its worker is dead, and while it waits for a dead worker.

``QKVAULT_SOAK_KILLS=20`` runs the kill test as the 20-kill soak (``python -m tests.soak`` does too).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from storage.index import Index, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import RestartableRedis, audit_chunks, bundle_files, kill_group, wait_until
from tests.services import start_worker
from tests.soak import fast_env, job_spec, kill_scenario, reconciler
from worker.app import create_celery_app, enqueue_export
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_sigkill_the_worker_mid_job_again_and_again_loses_nothing(
    redis_url: str, tiny_model_dir: Any, tmp_path: Path
) -> None:
    kills = int(os.environ.get("QKVAULT_SOAK_KILLS", "5"))
    jobs = 3 if kills <= 5 else 6
    report = kill_scenario(
        tmp_path, redis_url, tiny_model_dir("llama"), model_cache_dir(), kills=kills, jobs=jobs
    )
    print(report.summary())  # the figures docs/reliability.md quotes (pytest -rP shows them)
    assert len(report.kills) == kills, report.kills
    assert len({k["where"] for k in report.kills}) >= min(kills, 5)  # different points of the job
    assert report.ok, report
    # one attempt per job plus one per kill (more only if a loaded machine starved a heartbeat for
    # a whole lease timeout); the soak's figures show the exact count
    assert sum(report.attempts.values()) >= jobs + kills
    assert report.chunks_skipped > 0 and report.chunks_changed == 0


def _stack(tmp_path: Path, redis_url: str) -> tuple[WorkerSettings, Index, ObjectStore]:
    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        redis_url=redis_url,
        queue_name=f"qk-faults-{uuid.uuid4().hex[:8]}",
    )
    index = Index(settings.database_url)
    index.migrate()
    return settings, index, ObjectStore.from_settings(settings)


def _submit(
    settings: WorkerSettings, index: Index, store: ObjectStore, spec: dict[str, Any], n: int
) -> list[str]:
    app = create_celery_app(settings)
    ids = []
    for _ in range(n):
        job = index.create_job(spec=spec, owner="alice", store_url_for=store.bundle_url, max_attempts=3)
        enqueue_export(app, job.id)
        ids.append(job.id)
    app.close()
    return ids


def _running_with_chunks(index: Index, job_id: str, n: int) -> bool:
    job = index.get_job(job_id)
    return job.state is JobState.RUNNING and job.chunks_written >= n


def test_redis_restart_with_jobs_queued_and_one_running_loses_nothing(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    with RestartableRedis(tmp_path / "redis") as server:
        settings, index, store = _stack(tmp_path, server.url)
        spec = job_spec(tiny_model_dir("llama"), 0)
        ids = _submit(settings, index, store, spec, 3)
        env = fast_env(settings, model_cache_dir(), tiny_model_dir("llama"))
        with reconciler(env, tmp_path / "reconciler.log"), start_worker(env, tmp_path / "worker.log"):
            assert wait_until(lambda: _running_with_chunks(index, ids[0], 20), 120)
            server.crash()  # SIGKILL: what the AOF (fsync every second) holds is what survives
            queued_while_down = [index.get_job(j).state for j in ids[1:]]
            time.sleep(2)  # Redis stays down for a while; the running job goes on
            server.start()
            assert wait_until(lambda: all(index.get_job(j).terminal for j in ids), 240, 0.2)
        assert queued_while_down == [JobState.QUEUED, JobState.QUEUED]
        for job_id in ids:
            job = index.get_job(job_id)
            assert job.state is JobState.SUCCEEDED, job
            audit = audit_chunks(index, job, bundle_files(store, job.store_url))
            assert audit.clean and audit.rows == job.chunks_written, audit
        assert index.get_job(ids[0]).attempts == 1  # the running job was not disturbed


def test_cancel_while_running_while_the_worker_is_dead_and_while_waiting_for_it(
    redis_url: str, tiny_model_dir: Any, tmp_path: Path
) -> None:
    settings, index, store = _stack(tmp_path, redis_url)
    spec = job_spec(tiny_model_dir("llama"), 0)
    # long enough (about 1 s of decoding on 2 cores, against 0.2 s for the soak's jobs) that a cancel
    # requested after the first chunks always lands before the job ends
    spec["generation"]["max_new_tokens"] = 140
    running, dead, waiting = _submit(settings, index, store, spec, 3)
    env = fast_env(settings, model_cache_dir(), tiny_model_dir("llama"))
    app = create_celery_app(settings)
    with reconciler(env, tmp_path / "reconciler.log"):
        with start_worker(env, tmp_path / "worker.log") as proc:
            # 1. a running job: the worker stops at the next chunk boundary
            assert wait_until(lambda: _running_with_chunks(index, running, 10), 120)
            assert index.request_cancel(running).state is JobState.CANCELLING
            assert wait_until(lambda: index.get_job(running).terminal, 60)
            # 2. the next job runs; its worker is SIGKILLed
            assert wait_until(lambda: _running_with_chunks(index, dead, 10), 120)
            kill_group(proc)
        # cancelled while no worker runs: the dead job waits for the reconciler, the queued one ends now
        assert index.request_cancel(dead).state is JobState.CANCELLING
        assert index.request_cancel(waiting).state is JobState.CANCELLED
        assert wait_until(lambda: index.get_job(dead).terminal, 60)
        with start_worker(env, tmp_path / "worker.log"):
            for job_id in (dead, waiting):  # a redelivery of either message runs nothing
                enqueue_export(app, job_id)
                assert app.AsyncResult(job_id).get(timeout=120) is None
    app.close()
    first, second, third = (index.get_job(j) for j in (running, dead, waiting))
    assert first.state is JobState.CANCELLED and first.partial and first.attempts == 1
    assert second.state is JobState.CANCELLED and second.partial and second.attempts == 1
    assert third.state is JobState.CANCELLED and not third.partial and third.attempts == 0
    for job in (first, second):
        audit = audit_chunks(index, job, bundle_files(store, job.store_url))
        assert not audit.orphan_rows and not audit.bad_checksums and not audit.duplicate_rows, audit
