"""The reconciler against real Redis and a real index (SQLite, and PostgreSQL when reachable).

Each test injects one fault (docs/reliability.md lists them): a message never sent, a worker that
took a message and died, a worker that died mid-job before / at the attempt cap / while cancelling,
a worker that comes back between the reconciler's read and write. Time passes through ``now``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import ValidationError

from storage.index import ChunkRecord, Index, JobRecord, JobState
from storage.index import reconcile as sql
from storage.index.models import utcnow
from storage.stores.objectstore import ObjectStore
from tests.services import qkvault_env, start_worker, subprocess_env
from worker.app import enqueue_export
from worker.reconciler import ReconcileReport, reconcile_once
from worker.settings import WorkerSettings

from .conftest import REPO, model_cache_dir

DEAD = "host-a:4242"  # the lease holder whose process is gone


@pytest.fixture
def settings(redis_url: str, index: Index, tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        redis_url=redis_url,
        database_url=index.database_url,
        store_url=str(tmp_path / "store"),
        queue_name=f"qk-rc-{uuid.uuid4().hex[:8]}",
        heartbeat_interval_s=0.5,
        lease_timeout_s=120,
        requeue_after_s=60,
    )


def _create(index: Index, *, max_attempts: int = 3, spec: dict[str, Any] | None = None) -> JobRecord:
    return index.create_job(
        spec=spec or {"model": {"id": "none"}, "prompts": ["hi"]},
        owner="alice",
        store_url_for=lambda job_id: f"/nonexistent/jobs/{job_id}.zarr",
        max_attempts=max_attempts,
    )


def _later(seconds: float) -> Any:
    return utcnow() + timedelta(seconds=seconds)


def _queued(broker: redis.Redis, settings: WorkerSettings) -> list[str]:
    """Task ids of the messages waiting in the export queue, oldest first."""
    raw = broker.lrange(settings.queue_name, 0, -1)
    return [json.loads(m)["headers"]["id"] for m in reversed(raw)]


def _unacked(broker: redis.Redis, job_id: str) -> list[str]:
    return [
        tag.decode() if isinstance(tag, bytes) else str(tag)
        for tag, m in broker.hgetall("unacked").items()
        if json.loads(m)[0]["headers"]["id"] == job_id
    ]


def _take_and_die(broker: redis.Redis, settings: WorkerSettings, delivered_at: float | None = None) -> str:
    """A worker takes the oldest message (kombu's BRPOP + unacked bookkeeping, late ack) and is
    SIGKILLed before it acks: the message sits in the ``unacked`` hash until the visibility timeout."""
    raw = broker.rpop(settings.queue_name)
    assert isinstance(raw, bytes)
    payload = json.loads(raw)
    tag = payload["properties"]["delivery_tag"]
    broker.zadd("unacked_index", {tag: delivered_at or time.time()})
    broker.hset("unacked", tag, json.dumps([payload, "", settings.queue_name]))
    return str(payload["headers"]["id"])


def _nothing(report: ReconcileReport) -> bool:
    return report == ReconcileReport()


# -- rule 1: queued jobs whose message was lost --------------------------------------------------


def test_api_dies_before_enqueue_then_a_real_worker_runs_the_job(
    index: Index,
    settings: WorkerSettings,
    app: Celery,
    broker: redis.Redis,
    tiny_model_dir: Any,
    tmp_path: Path,
) -> None:
    """Fault: the API committed the job and died before ``enqueue_export``; no message exists."""
    if index.engine.dialect.name != "sqlite":
        pytest.skip("one worker-process run is enough; the SQL is covered on PostgreSQL below")
    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["hi"],
        "generation": {"max_new_tokens": 2},
    }
    store = ObjectStore.from_settings(settings)
    job = index.create_job(spec=spec, owner="alice", max_attempts=3, store_url_for=store.bundle_url)
    assert _nothing(reconcile_once(index, app, settings))  # not old enough yet
    now = _later(settings.requeue_after_s + 1)
    assert reconcile_once(index, app, settings, now=now).requeued_lost == 1
    assert _queued(broker, settings) == [job.id]  # task id = job id
    assert index.get_job(job.id).updated_at == now  # marked: not re-enqueued every pass
    assert _nothing(reconcile_once(index, app, settings, now=now))  # a second pass does nothing
    env = qkvault_env(
        redis_url=settings.redis_url,
        database_url=index.database_url,
        store_url=settings.store_url,
        queue_name=settings.queue_name,
        device="cpu",
        model_cache_dir=str(model_cache_dir()),
        model_roots=[tiny_model_dir("llama").parent],
        heartbeat_interval_s=0.5,
        progress_interval_s=0.1,
    )
    with start_worker(env, tmp_path / "worker.log"):
        deadline = time.monotonic() + 60
        while not (done := index.get_job(job.id)).terminal and time.monotonic() < deadline:
            time.sleep(0.2)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1, done


def test_message_still_waiting_in_the_queue_is_not_sent_twice(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    """Not a fault: a job queued behind long jobs for longer than requeue_after_s."""
    job = _create(index)
    enqueue_export(app, job.id)
    report = reconcile_once(index, app, settings, now=_later(3600))
    assert report.still_in_broker == 1 and report.requeued_lost == 0
    assert _queued(broker, settings) == [job.id]


def test_worker_took_the_message_and_died_before_claiming(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    """Fault: delivered to a worker that was SIGKILLed before its claim (message stuck in unacked).
    A delivery younger than requeue_after_s is a live worker's and is left alone."""
    job = _create(index)
    enqueue_export(app, job.id)
    _take_and_die(broker, settings, delivered_at=time.time() + 30)  # taken after 30 s in the queue
    fresh = reconcile_once(index, app, settings, now=_later(settings.requeue_after_s + 1))
    assert fresh.still_in_broker == 1 and fresh.changed == 0 and _queued(broker, settings) == []
    report = reconcile_once(index, app, settings, now=_later(settings.requeue_after_s + 40))
    assert report.requeued_lost == 1
    assert _queued(broker, settings) == [job.id] and _unacked(broker, job.id) == []


# -- rule 2: running jobs whose lease expired ----------------------------------------------------


def test_expired_lease_under_the_cap_is_queued_and_reenqueued(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    """Fault: the worker (Celery parent and child) is SIGKILLed mid-job: heartbeats stop, its
    late-acked message stays in kombu's unacked hash."""
    job = _create(index)
    enqueue_export(app, job.id)
    _take_and_die(broker, settings)
    assert index.claim(job.id, DEAD) is not None
    now = _later(settings.lease_timeout_s + 1)
    report = reconcile_once(index, app, settings, now=now)
    assert report.requeued_expired == 1 and report.changed == 1
    after = index.get_job(job.id)
    assert after.state is JobState.QUEUED and after.lease_worker is None and after.attempts == 1
    assert _queued(broker, settings) == [job.id]
    assert _unacked(broker, job.id) == []  # no second copy for kombu to redeliver hours later
    assert _nothing(reconcile_once(index, app, settings, now=now))
    again = index.claim(job.id, "host-b:1")
    assert again is not None and again.attempts == 2  # the next claim is the next attempt


def test_expired_lease_at_the_cap_fails_with_a_problem_document(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    """Fault: the worker dies during the last allowed attempt."""
    job = _create(index, max_attempts=2)
    index.claim(job.id, "host-a:1")
    index.claim(job.id, DEAD, lease_timeout_s=0)  # attempt 1's worker hung; a redelivery started attempt 2
    report = reconcile_once(index, app, settings, now=_later(settings.lease_timeout_s + 1))
    assert report.failed_expired == 1 and report.changed == 1
    failed = index.get_job(job.id)
    assert failed.state is JobState.FAILED and failed.lease_worker is None and failed.finished_at
    assert failed.error is not None and failed.error["type"] == "lease-expired"
    assert failed.error["last_worker"] == DEAD and failed.error["attempts"] == 2
    assert DEAD in failed.error["detail"] and not failed.partial
    assert _queued(broker, settings) == []
    assert _nothing(reconcile_once(index, app, settings, now=_later(10 * settings.lease_timeout_s)))


def test_expired_lease_with_cancel_requested_ends_cancelled(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    """Fault: cancel requested, then the worker dies before it reaches a chunk boundary."""
    job = _create(index)
    index.claim(job.id, DEAD)
    index.record_chunks(job.id, [ChunkRecord("q", (0, 0), "q/c/0/0", 10, "sha256:00")])
    assert index.request_cancel(job.id).state is JobState.CANCELLING
    report = reconcile_once(index, app, settings, now=_later(settings.lease_timeout_s + 1))
    assert report.cancelled_expired == 1 and report.changed == 1
    cancelled = index.get_job(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.partial and cancelled.lease_worker is None
    assert _queued(broker, settings) == []


# -- rule 3: live workers are never touched ------------------------------------------------------


def test_fresh_heartbeat_is_never_touched(index: Index, settings: WorkerSettings, app: Celery) -> None:
    """Not a fault: a live worker; beside it a dead one, handled in the same pass."""
    live, dead = _create(index), _create(index)
    index.claim(dead.id, DEAD)
    time.sleep(0.01)
    index.claim(live.id, "host-b:1")
    before = index.get_job(live.id)
    assert _nothing(reconcile_once(index, app, settings, now=_later(settings.lease_timeout_s - 1)))
    index.heartbeat(live.id, "host-b:1")
    cutoff = index.get_job(live.id).heartbeat_at
    assert cutoff is not None
    report = reconcile_once(index, app, settings, now=cutoff + timedelta(seconds=settings.lease_timeout_s))
    assert report.requeued_expired == 1 and report.changed == 1  # the dead one only
    after = index.get_job(live.id)
    assert after.state is JobState.RUNNING and after.lease_worker == "host-b:1"
    assert (after.attempts, after.updated_at) == (before.attempts, before.updated_at)


def test_worker_that_comes_back_between_read_and_write_wins(index: Index) -> None:
    """Fault: the worker stalls past the lease timeout (GC pause, network partition) and beats
    again just after the reconciler read the row: every conditional UPDATE refuses."""
    job = _create(index)
    index.claim(job.id, DEAD)
    (seen,) = sql.expired_leases(index, beat_before=_later(121))
    time.sleep(0.002)
    index.heartbeat(job.id, DEAD)
    now = _later(121)
    assert not sql.requeue_expired(index, seen, now)
    assert not sql.end_expired(index, seen, JobState.FAILED, now, error={"type": "x"})
    assert not sql.end_expired(index, seen, JobState.CANCELLED, now)
    row = index.get_job(job.id)
    assert (
        row.state is JobState.RUNNING and row.lease_worker == DEAD and row.heartbeat_at != seen.heartbeat_at
    )
    queued = _create(index)
    (stale,) = sql.stale_queued(index, untouched_since=_later(61))
    index.request_cancel(queued.id)  # cancelled between the read and the re-enqueue
    assert not sql.mark_requeued(index, stale, _later(61))
    assert index.get_job(queued.id).state is JobState.CANCELLED


# -- settings and the command ---------------------------------------------------------------------


def test_lease_timeout_must_exceed_the_heartbeat_interval() -> None:
    with pytest.raises(ValidationError, match="lease_timeout_s"):
        WorkerSettings(heartbeat_interval_s=30, lease_timeout_s=30)
    assert WorkerSettings(heartbeat_interval_s=1, lease_timeout_s=3).lease_timeout_s == 3


def test_command_runs_one_pass_without_torch(
    index: Index, settings: WorkerSettings, broker: redis.Redis
) -> None:
    """``python -m worker.reconciler --once``: configured from QKVAULT_*, loads no torch."""
    if index.engine.dialect.name != "sqlite":
        pytest.skip("the command is the same on every database")
    job = _create(index)
    time.sleep(0.05)
    env = qkvault_env(
        redis_url=settings.redis_url,
        database_url=index.database_url,
        queue_name=settings.queue_name,
        requeue_after_s=0.01,
    )
    probe = "import sys, runpy; sys.argv = ['r', '--once']; runpy.run_module('worker.reconciler', "
    probe += "run_name='__main__'); assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "requeued_lost=1" in done.stderr
    assert _queued(broker, settings) == [job.id]
