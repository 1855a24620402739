"""Resume by chunk and lease fencing in the job runner (real SQLite index, real local store, tiny model).

A worker "dies" in-process: the index raises a BaseException (as far as the job runner can tell, the
process is gone: nothing after that point runs, the job stays ``running`` under the dead lease).
The retried attempt must skip verified chunks, rewrite missing or corrupt ones, and leave a bundle
identical to an uninterrupted run of the same job (docs/reliability.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from storage.index import ChunkRecord, Index, JobState
from storage.index import reconcile as sql
from storage.index.models import utcnow
from storage.stores.objectstore import ObjectStore
from tests.faults import audit_chunks, bundle_differences, bundle_files
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

JOB_ID = "00000000-0000-4000-8000-00000000c0de"  # the same id in both runs: identical root attributes


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so the job runner's handlers never see it."""


class DyingIndex(Index):
    """A real index whose worker process "dies" right after the batch of chunk records that brings
    the count to ``die_after`` is recorded."""

    die_after: int | None = None
    recorded = 0

    def record_chunks(self, job_id: str, chunks: Sequence[ChunkRecord], *, worker: str | None = None) -> None:
        super().record_chunks(job_id, chunks, worker=worker)
        self.recorded += len(chunks)
        if self.die_after is not None and self.recorded >= self.die_after:
            raise Killed(f"killed after {self.recorded} chunks were recorded")


def _spec(model: Path) -> dict[str, Any]:
    return {
        "model": {"id": str(model)},
        "prompts": ["the quick brown fox jumps over the lazy dog " * 2, "resume me"],
        "generation": {"max_new_tokens": 20},
        "capture": {"qkv": True, "alternatives": True},
        "storage": {"chunk_rows": 16},
    }


def _stack(root: Path, index_cls: type[Index] = Index) -> tuple[Index, ObjectStore, WorkerSettings]:
    settings = WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=str(root / "store"),
        progress_interval_s=0.0,
        heartbeat_interval_s=0.2,
        lease_timeout_s=30,
        model_cache_dir=model_cache_dir(),
        record_interval_s=0.0,  # one chunk batch per row block: "die after N batches" has N points
    )
    index = index_cls(settings.database_url)
    index.migrate()
    return index, ObjectStore.from_settings(settings), settings


def _run(index: Index, store: ObjectStore, settings: WorkerSettings, worker: str) -> JobState | None:
    models = ModelCache(model_cache_dir(), "cpu")
    return run_job(JOB_ID, index=index, store=store, models=models, settings=settings, worker_id=worker)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bundle of an uninterrupted run of the job."""
    index, store, settings = _stack(tmp_path_factory.mktemp("reference"))
    index.create_job(
        spec=_spec(tiny_model_dir("llama")),
        owner="alice",
        store_url_for=store.bundle_url,
        max_attempts=1,
        job_id=JOB_ID,
    )
    assert _run(index, store, settings, "ref-worker") is JobState.SUCCEEDED
    files = bundle_files(store, index.get_job(JOB_ID).store_url)
    index.dispose()
    return files


def _expire(index: Index) -> None:
    """The reconciler's move for the dead attempt: its lease expired, the job is queued again."""
    (seen,) = sql.expired_leases(index, beat_before=utcnow())
    assert sql.requeue_expired(index, seen, utcnow())


@pytest.mark.parametrize("die_at", [0.0, 0.3, 0.8])  # fraction of the job's chunks recorded
def test_retry_after_a_dead_attempt_skips_verified_chunks_and_matches_an_uninterrupted_run(
    reference: dict[str, bytes], tiny_model_dir: Any, tmp_path: Path, die_at: float
) -> None:
    index, store, settings = _stack(tmp_path, DyingIndex)
    assert isinstance(index, DyingIndex)
    job = index.create_job(
        spec=_spec(tiny_model_dir("llama")),
        owner="alice",
        store_url_for=store.bundle_url,
        max_attempts=3,
        job_id=JOB_ID,
    )
    index.die_after = max(1, int(die_at * sum("/c/" in k for k in reference)))
    with pytest.raises(Killed):
        _run(index, store, settings, "dead-worker")
    index.die_after = None
    died = index.get_job(JOB_ID)
    assert died.state is JobState.RUNNING and died.lease_worker == "dead-worker" and died.chunks_written > 0
    recorded = index.list_chunks(JOB_ID)
    # the store loses one recorded chunk and another one is corrupted (same size, other bytes)
    root = Path(job.store_url)
    (root / recorded[0].key).unlink()
    if len(recorded) > 1:
        damaged = bytearray((root / recorded[-1].key).read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        (root / recorded[-1].key).write_bytes(bytes(damaged))
    n_damaged = min(2, len(recorded))

    _expire(index)
    assert _run(index, store, settings, "second-worker") is JobState.SUCCEEDED
    done = index.get_job(JOB_ID)
    assert done.attempts == 2 and done.error is None
    assert done.result is not None
    resume = done.result["resume"]
    assert resume["attempt"] == 2 and resume["chunks_recorded"] == len(recorded)
    assert resume["chunks_skipped"] == len(recorded) - n_damaged and resume["chunks_rewritten"] == n_damaged
    assert resume["chunks_changed"] == 0
    files = bundle_files(store, job.store_url)
    assert bundle_differences(files, reference) == []
    audit = audit_chunks(index, done, files)
    assert audit.clean, audit
    assert audit.rows == done.chunks_written == sum("/c/" in k for k in reference)
    assert json.loads(files["zarr.json"])["attributes"]["complete"] is True


def test_worker_that_lost_its_lease_stops_without_touching_the_job(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    """Mid-job the lease moves (the worker stalled past the lease timeout, the reconciler requeued
    the job, another worker claimed it): the stale attempt stops and changes nothing."""

    class StolenIndex(Index):
        def record_chunks(
            self, job_id: str, chunks: Sequence[ChunkRecord], *, worker: str | None = None
        ) -> None:
            if worker == "stale-worker" and self.get_job(job_id).lease_worker == worker:
                _expire(self)
                assert self.claim(job_id, "new-worker") is not None
            super().record_chunks(job_id, chunks, worker=worker)

    index, store, settings = _stack(tmp_path, StolenIndex)
    index.create_job(
        spec=_spec(tiny_model_dir("llama")),
        owner="alice",
        store_url_for=store.bundle_url,
        max_attempts=3,
        job_id=JOB_ID,
    )
    assert _run(index, store, settings, "stale-worker") is None
    job = index.get_job(JOB_ID)
    assert (job.state, job.lease_worker, job.attempts) == (JobState.RUNNING, "new-worker", 2)
    assert job.chunks_written == 0 and job.result is None and job.error is None
