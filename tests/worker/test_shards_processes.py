"""A sharded bulk job on real Celery worker processes (real Redis, SQLite, local store, the
reconciler running): two workers share its shards; one is SIGKILLed mid-shard and its shard is
taken over (the reconciler re-sends it once its lease expires); the bundle equals a one-worker
run's (every array of every sequence, and the table); the job's result shows the shards and who
ran which; a cancel stops every shard of the next job and its finalize keeps the finished
micro-batches; a lost finalize message is sent again by the reconciler; a one-batch job is cut
by its layers over the two workers and its bundle equals a one-worker run's."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from storage.bundle.bulk import open_bulk
from storage.index import Index, JobState
from storage.index import shards as sh
from storage.stores.objectstore import ObjectStore
from tests.faults import audit_chunks, bundle_differences, bundle_files, kill_group, wait_until
from tests.services import start_worker
from tests.soak import fast_env, reconciler
from worker.app import create_celery_app, enqueue_export
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings
from worker.shards import run_shard

from .conftest import model_cache_dir
from .test_layer_shards import CAPTURES, layer_spec
from .test_shards import bulk_spec

pytestmark = [pytest.mark.slow, pytest.mark.integration]

JOB_ID = "00000000-0000-4000-8000-00000005a4d1"
CANCELLED_ID = "00000000-0000-4000-8000-00000005a4d2"
LOST_ID = "00000000-0000-4000-8000-00000005a4d3"
LAYERS_ID = "00000000-0000-4000-8000-00000005a4d4"


def _pool_pids(proc: Any) -> set[int]:
    """The worker's pids: the Celery parent and its pool children (worker ids are host:pid)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    found = {int(p) for p in children.read_text().split()} if children.exists() else set()
    return {proc.pid, *found}


def _running_on(index: Index, job_id: str, pids: set[int]) -> bool:
    """A shard of the job runs on one of ``pids``, past its first micro-batch and before its last."""
    return any(
        s.state == "running"
        and 0 < s.units_done < s.units_total
        and int(str(s.lease_worker).rsplit(":", 1)[1]) in pids
        for s in sh.list_shards(index, job_id)
    )


def test_two_workers_share_a_job_and_a_sigkill_mid_shard_leaves_the_bundle_identical(
    redis_url: str, tiny_model_dir: Any, tmp_path: Path
) -> None:
    model, cache = tiny_model_dir("llama"), model_cache_dir()
    # 16 decoding steps a micro-batch (bulk_spec's 3 take a few ms): the victim's shard must be seen
    # between its two micro-batches, on a fast machine too
    spec = {**bulk_spec(model, sequences=36), "generation": {"max_new_tokens": 16}}
    ref = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/ref.db", store_url=str(tmp_path / "ref"), model_cache_dir=cache
    )
    ref_index, ref_store = Index(ref.database_url), ObjectStore.from_settings(ref)
    ref_index.migrate()
    ref_index.create_job(
        spec=spec, owner="t", store_url_for=ref_store.bundle_url, max_attempts=1, job_id=JOB_ID
    )
    models = ModelCache(cache, "cpu")
    assert run_job(JOB_ID, index=ref_index, store=ref_store, models=models, settings=ref, worker_id="ref")
    reference = bundle_files(ref_store, ref_index.get_job(JOB_ID).store_url)

    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        redis_url=redis_url,
        queue_name=f"qk-shards-{uuid.uuid4().hex[:8]}",
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    index.create_job(spec=spec, owner="t", store_url_for=store.bundle_url, max_attempts=3, job_id=JOB_ID)
    app = create_celery_app(settings)
    env = {
        **fast_env(settings, cache, model),
        "QKVAULT_SHARD_MICRO_BATCHES": "2",
        "QKVAULT_SHARD_LAYERS": "1",
    }
    with (
        reconciler(env, tmp_path / "reconciler.log"),
        start_worker(env, tmp_path / "w1.log") as first,
        start_worker(env, tmp_path / "w2.log"),
    ):
        enqueue_export(app, JOB_ID)
        victim = wait_until(lambda: _running_on(index, JOB_ID, _pool_pids(first)), 120, poll_s=0.02)
        assert victim, index.get_job(JOB_ID)
        killed = _pool_pids(first)
        kill_group(first)
        assert wait_until(lambda: index.get_job(JOB_ID).terminal, 120, poll_s=0.2)
        done = index.get_job(JOB_ID)
        assert done.state is JobState.SUCCEEDED, done.error
        shards = sh.list_shards(index, JOB_ID)
        assert len(shards) >= 3 and max(s.attempts for s in shards) == 2  # one shard taken over
        assert done.result is not None and done.result["shards"]["count"] == len(shards)
        runs = done.result["shards"]["runs"]
        assert all(r["worker"].startswith(f"{os.uname().nodename}:") for r in runs)
        [taken] = [r for r in runs if r["attempts"] == 2]  # run last by the survivor
        assert int(taken["worker"].rsplit(":", 1)[1]) not in killed
        files = bundle_files(store, done.store_url)
        assert bundle_differences(files, reference) == []
        assert audit_chunks(index, done, files).clean

        # the next job (created now: the reconciler sends a queued job it finds), 100 micro-batches,
        # on the survivor alone; a cancel stops every shard
        cancelled_spec = bulk_spec(model, sequences=600, shuffle_seed=None)
        index.create_job(
            spec=cancelled_spec,
            owner="t",
            store_url_for=store.bundle_url,
            max_attempts=3,
            job_id=CANCELLED_ID,
        )
        enqueue_export(app, CANCELLED_ID)
        # as soon as the job is planned into shards (a tiny job's shards finish within a second)
        assert wait_until(lambda: len(sh.list_shards(index, CANCELLED_ID)) > 0, 120, poll_s=0.02)
        index.request_cancel(CANCELLED_ID)
        assert wait_until(lambda: index.get_job(CANCELLED_ID).terminal, 60, poll_s=0.1)
        cancelled = index.get_job(CANCELLED_ID)
        assert cancelled.state is JobState.CANCELLED and cancelled.units_done < 600
        assert {s.state for s in sh.list_shards(index, CANCELLED_ID)} <= {"succeeded", "cancelled"}
        assert "cancelled" in {s.state for s in sh.list_shards(index, CANCELLED_ID)}
        # its finalize kept the finished micro-batches, as one worker's cancelled job does
        kept = open_bulk(cancelled.store_url)
        assert cancelled.partial and cancelled.result is not None
        assert "partial_table" not in kept.sequences.attrs and kept.attrs.get("partial") is True
        finished = [int(group.rsplit("/", 1)[1]) for group in kept.batches()]
        assert sorted(set(kept.sequences["batch"].values.tolist())) == finished
        assert len(kept.sequences["sequence"]) == cancelled.result["sequences"]
        assert audit_chunks(index, cancelled, bundle_files(store, cancelled.store_url)).clean

        # a job whose shards all ran (here, in this process) but whose finalize message was lost:
        # the reconciler sends it again and a worker finalizes the job
        lost_spec = bulk_spec(model, sequences=12, shuffle_seed=None)
        index.create_job(
            spec=lost_spec, owner="t", store_url_for=store.bundle_url, max_attempts=3, job_id=LOST_ID
        )
        here = settings.model_copy(update={"shard_micro_batches": 2, "model_cache_dir": cache})
        launched: list[list[int]] = []
        run_job(
            LOST_ID, index=index, store=store, models=models, settings=here, worker_id="here:1",
            launch_shards=lambda job, shards: launched.append(shards),
        )  # fmt: skip
        outcomes = [
            run_shard(LOST_ID, n, index=index, store=store, models=models, settings=here, worker_id="here:1")
            for n in launched[0]
        ]
        assert len(outcomes) >= 2 and outcomes[-1] == "finalize"  # not sent: the message is "lost"
        assert wait_until(lambda: index.get_job(LOST_ID).terminal, 60, poll_s=0.1)
        lost = index.get_job(LOST_ID)
        assert lost.state is JobState.SUCCEEDED and lost.result is not None and lost.result["sequences"] == 12

        # a one-batch job is cut by its layers (QKVAULT_SHARD_LAYERS=1: one shard per layer)
        one_batch = layer_spec(model, CAPTURES["summary-induction"])
        ref_index.create_job(
            spec=one_batch, owner="t", store_url_for=ref_store.bundle_url, max_attempts=1, job_id=LAYERS_ID
        )
        assert run_job(
            LAYERS_ID, index=ref_index, store=ref_store, models=models, settings=ref, worker_id="ref"
        )
        index.create_job(
            spec=one_batch, owner="t", store_url_for=store.bundle_url, max_attempts=3, job_id=LAYERS_ID
        )
        enqueue_export(app, LAYERS_ID)
        assert wait_until(lambda: index.get_job(LAYERS_ID).terminal, 60, poll_s=0.1)
        layered = index.get_job(LAYERS_ID)
        assert layered.state is JobState.SUCCEEDED and layered.result is not None, layered.error
        assert layered.result["shards"]["unit"] == "layers" and layered.result["shards"]["count"] == 2
        files = bundle_files(store, layered.store_url)
        assert (
            bundle_differences(files, bundle_files(ref_store, ref_index.get_job(LAYERS_ID).store_url)) == []
        )
        assert audit_chunks(index, layered, files).clean
    app.close()
    index.dispose()
    ref_index.dispose()
