"""Routing by placement (storage/models/routing.py) on real Redis: the reconciler sends a placed job
to its own queue and looks for its message there; two real worker processes that offer different
packages (``QKVAULT_PLACEMENT_PACKAGES``) run what they offer: a placed job (``device_map``, which
needs accelerate), sharded, only on the worker offering accelerate; plain jobs on either."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from storage.index import Index, JobRecord, JobState
from storage.index import shards as sh
from storage.index.models import utcnow
from storage.models.routing import stored_job_queue
from storage.models.workers import live_reports, report_key
from storage.stores.objectstore import ObjectStore
from tests.faults import wait_until
from tests.services import start_worker
from tests.soak import fast_env
from worker.app import create_celery_app, enqueue_export
from worker.reconciler import reconcile_once
from worker.settings import WorkerSettings

from .conftest import model_cache_dir
from .test_shards import bulk_spec

PLACED = {"id": "none", "device_map": "auto"}  # needs accelerate: queue <base>.accelerate


@pytest.fixture
def settings(redis_url: str, index: Index, tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        redis_url=redis_url,
        database_url=index.database_url,
        store_url=str(tmp_path / "store"),
        queue_name=f"qk-route-{uuid.uuid4().hex[:8]}",
        lease_timeout_s=120,
        requeue_after_s=60,
    )


def _waiting(broker: redis.Redis, queue: str) -> list[str]:
    """Task ids of the messages waiting in ``queue``, oldest first."""
    return [json.loads(m)["headers"]["id"] for m in reversed(broker.lrange(queue, 0, -1))]


def _create(index: Index, model: dict[str, Any]) -> JobRecord:
    return index.create_job(
        spec={"model": model, "prompts": ["hi"]},
        owner="alice",
        store_url_for=lambda job_id: f"/nonexistent/jobs/{job_id}.zarr",
        max_attempts=3,
    )


def test_the_reconciler_sends_a_placed_job_to_its_queue_and_finds_it_there(
    index: Index, settings: WorkerSettings, app: Celery, broker: redis.Redis
) -> None:
    base, routed = settings.queue_name, f"{settings.queue_name}.accelerate"
    lost = _create(index, PLACED)  # its message was never sent
    later = utcnow() + timedelta(seconds=settings.requeue_after_s + 1)
    assert reconcile_once(index, app, settings, now=later).requeued_lost == 1
    assert _waiting(broker, routed) == [lost.id] and _waiting(broker, base) == []

    waiting = _create(index, PLACED)  # its message waits in its own queue: not sent twice
    enqueue_export(app, waiting.id, queue=stored_job_queue(base, waiting.spec))
    report = reconcile_once(index, app, settings, now=later + timedelta(hours=1))
    assert report.still_in_broker == 2 and report.requeued_lost == 0
    assert _waiting(broker, routed) == [lost.id, waiting.id]

    expired = _create(index, PLACED)  # its worker died: queued again, into its queue
    assert index.claim(expired.id, "host-a:1") is not None
    report = reconcile_once(index, app, settings, now=later + timedelta(seconds=settings.lease_timeout_s))
    assert report.requeued_expired == 1
    assert _waiting(broker, routed) == [lost.id, waiting.id, expired.id] and _waiting(broker, base) == []


def _pool_pids(proc: Any) -> set[int]:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    return {proc.pid, *(int(p) for p in children.read_text().split())} if children.exists() else {proc.pid}


def _report(broker: redis.Redis, queue: str, worker: str) -> dict[str, Any]:
    raw = broker.get(report_key(queue, worker))
    return json.loads(raw) if raw else {}


def _ran_on(app: Celery, job_id: str) -> int:
    """The pid of the ``python -m worker`` (Celery node ``qkvault-<pid>@host``) that ran the job's
    export task, from its result (result_extended)."""
    node = AsyncResult(job_id, app=app).worker
    assert isinstance(node, str) and node.startswith("qkvault-"), node
    return int(node.split("@")[0].removeprefix("qkvault-"))


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_run_what_they_offer(redis_url: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    model, cache = tiny_model_dir("llama"), model_cache_dir()
    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        redis_url=redis_url,
        queue_name=f"qk-route-{uuid.uuid4().hex[:8]}",
    )
    base, broker = settings.queue_name, redis.Redis.from_url(redis_url)
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    app = create_celery_app(settings)
    env = {**fast_env(settings, cache, model), "QKVAULT_SHARD_MICRO_BATCHES": "1"}

    def create(spec: dict[str, Any]) -> str:
        job = index.create_job(spec=spec, owner="t", store_url_for=store.bundle_url, max_attempts=2)
        enqueue_export(app, job.id, queue=stored_job_queue(base, job.spec))
        return job.id

    with (
        start_worker(env, tmp_path / "offers.log") as offers,
        start_worker({**env, "QKVAULT_PLACEMENT_PACKAGES": "none"}, tmp_path / "plain.log") as plain,
    ):
        # both reported; the one offering accelerate consumes <base>.accelerate too
        assert wait_until(lambda: len(live_reports(broker, base)) == 2, 60, 0.1)
        offering = {
            w for w, _ in live_reports(broker, base) if int(w.rsplit(":", 1)[1]) in _pool_pids(offers)
        }
        assert len(offering) == 1
        assert wait_until(
            lambda: all(f"{base}.accelerate" in _report(broker, base, w).get("queues", []) for w in offering),
            30,
            0.1,
        )
        [(withheld, caps)] = [(w, c) for w, c in live_reports(broker, base) if w not in offering]
        assert caps.accelerate is None and "accelerate: not offered" in " ".join(caps.notes)
        assert _report(broker, base, withheld)["queues"] == [base]

        # a placed bulk job, sharded: planned, sharded and finalized on the worker offering accelerate
        placed_spec = bulk_spec(model, sequences=12, shuffle_seed=None)
        placed_spec["model"]["device_map"] = "auto"
        placed = create(placed_spec)
        assert wait_until(lambda: index.get_job(placed).state is not JobState.QUEUED, 60, 0.05)
        plain_jobs = [
            create(
                {"model": {"id": str(model)}, "prompts": ["hi there"], "generation": {"max_new_tokens": 2}}
            )
            for _ in range(2)
        ]
        jobs = [placed, *plain_jobs]
        assert wait_until(lambda: all(index.get_job(j).terminal for j in jobs), 120, 0.2)
        for job_id in jobs:
            done = index.get_job(job_id)
            assert done.state is JobState.SUCCEEDED, (job_id, done.error)

        assert _ran_on(app, placed) == offers.pid
        assert AsyncResult(placed, app=app).queue == f"{base}.accelerate"
        shards = sh.list_shards(index, placed)
        assert len(shards) >= 2
        assert all(int(str(s.last_worker).rsplit(":", 1)[1]) in _pool_pids(offers) for s in shards)
        # the worker that offers nothing took a plain job (it was idle while the other ran the placed one)
        assert plain.pid in {_ran_on(app, j) for j in plain_jobs}
        assert all(AsyncResult(j, app=app).queue == base for j in plain_jobs)
    app.close()
    index.dispose()
    broker.close()


def test_the_reporter_offers_what_the_setting_allows_and_subscribes_until_the_node_answers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two GPUs, accelerate and bitsandbytes, ``QKVAULT_PLACEMENT_PACKAGES=accelerate``: no ``.bnb``
    queue; the node does not answer the first ``add_consumer`` (not listening yet): reported queues
    grow once it does."""
    from storage.models.placement import GIB, GpuInfo, WorkerCapabilities
    from worker import capabilities

    probed = WorkerCapabilities(
        "cuda", (GpuInfo(0, "g", GIB), GpuInfo(1, "g", GIB)), "1.1", "0.45", notes=("x: note",)
    )
    monkeypatch.setattr(capabilities, "local_capabilities", lambda device: probed)
    base = f"qk-route-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(redis_url=redis_url, queue_name=base, placement_packages="accelerate")
    answers, asked = [False, True, True, True], []

    def subscribe(queue: str) -> bool:
        asked.append(queue)
        return answers[len(asked) - 1]

    client = redis.Redis.from_url(redis_url)
    reporter = capabilities.CapabilityReporter(settings, client=client, subscribe=subscribe)
    reporter.report_once()
    assert asked == [f"{base}.accelerate"] and not reporter.subscribed  # stopped at the refusal
    assert _report(client, base, reporter.worker_id)["queues"] == [base]
    reporter.report_once()
    wanted = [base, f"{base}.accelerate", f"{base}.gpus-1", f"{base}.gpus-2"]
    assert reporter.subscribed and reporter.wanted == wanted and len(asked) == 4
    doc = _report(client, base, reporter.worker_id)
    assert doc["queues"] == wanted and doc["bitsandbytes"] is None and doc["accelerate"] == "1.1"
    assert doc["notes"] == ["x: note", "bitsandbytes: not offered (QKVAULT_PLACEMENT_PACKAGES)"]
    reporter.stop()
    assert client.get(report_key(base, reporter.worker_id)) is None
    client.close()
