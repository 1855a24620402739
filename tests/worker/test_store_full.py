"""A store disk that fills up or turns read-only under a running job, with the real processes:
``python -m worker`` (Celery, prefork) on real Redis, a SQLite index, and a local store on a small
tmpfs this module mounts (docs/reliability.md, "Disk full and unwritable stores"). Mounting needs
root: the module is skipped, with the reason, where it cannot mount.

- the disk fills up mid-job: the attempt gives the job back (``queued``, the ENOSPC problem in its
  ``error`` with ``retrying: true``); once space is freed the next attempt resumes by chunk and the
  bundle is identical to an uninterrupted run;
- the disk is read-only: the same with EROFS, until it is remounted read-write;
- the disk stays full: the last attempt fails the job with a problem naming the disk and the fix.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.index import Index, JobRecord, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import Tmpfs, audit_chunks, bundle_differences, bundle_files, wait_until
from tests.services import start_worker
from tests.soak import fast_env, job_spec
from worker.app import create_celery_app, enqueue_export
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

FULL = "00000000-0000-4000-8000-0000000000b1"
READ_ONLY = "00000000-0000-4000-8000-0000000000b2"
EXHAUSTED = "00000000-0000-4000-8000-0000000000b3"
SPECS = {FULL: 0, READ_ONLY: 1, EXHAUSTED: 2}  # job -> n of tests.soak.job_spec

DISK_BYTES = 8 << 20
RETRY_DELAY_S = 2.0  # QKVAULT_RETRY_DELAY_S: the test frees the disk well within it
PAGE = 4096  # a tmpfs file takes whole pages

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@dataclass
class Stack:
    index: Index
    store: ObjectStore
    settings: WorkerSettings
    disk: Tmpfs
    model: Path


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmpfs]:
    with Tmpfs.mounted_or_skip(tmp_path_factory, DISK_BYTES) as mounted:
        yield mounted


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs (a local store on an ordinary disk) of the jobs below, under the same ids."""
    from worker.jobs import run_job
    from worker.models import ModelCache

    root = tmp_path_factory.mktemp("disk-reference")
    settings = WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=str(root / "store"),
        model_cache_dir=model_cache_dir(),
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    models = ModelCache(model_cache_dir(), "cpu")
    out = {}
    for job_id in (FULL, READ_ONLY):
        spec = job_spec(tiny_model_dir("llama"), SPECS[job_id])
        index.create_job(
            spec=spec, owner="alice", store_url_for=store.bundle_url, max_attempts=1, job_id=job_id
        )
        assert run_job(job_id, index=index, store=store, models=models, settings=settings, worker_id="ref")
        out[job_id] = bundle_files(store, index.get_job(job_id).store_url)
    index.dispose()
    return out


@pytest.fixture(scope="module")
def stack(
    disk: Tmpfs, redis_url: str, tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One real worker for the module, its store on the tmpfs, a fast retry of given-back jobs."""
    root = tmp_path_factory.mktemp("disk-stack")
    settings = WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=str(disk.path),
        redis_url=redis_url,
        queue_name=f"qk-disk-{uuid.uuid4().hex[:8]}",
    )
    index = Index(settings.database_url)
    index.migrate()
    model = tiny_model_dir("llama")
    env = {**fast_env(settings, model_cache_dir(), model), "QKVAULT_RETRY_DELAY_S": str(RETRY_DELAY_S)}
    with start_worker(env, root / "worker.log"):
        yield Stack(index, ObjectStore.from_settings(settings), settings, disk, model)
    index.dispose()


@pytest.fixture
def env(stack: Stack) -> Iterator[Stack]:
    """The stack with its disk empty of filler and writable again after each test."""
    yield stack
    stack.disk.remount(read_only=False)
    stack.disk.free()


def _submit(stack: Stack, job_id: str, max_attempts: int) -> None:
    spec = job_spec(stack.model, SPECS[job_id])
    stack.index.create_job(
        spec=spec,
        owner="alice",
        store_url_for=stack.store.bundle_url,
        max_attempts=max_attempts,
        job_id=job_id,
    )
    app = create_celery_app(stack.settings)
    enqueue_export(app, job_id)
    app.close()


def _given_back(stack: Stack, job_id: str) -> JobRecord | None:
    """The job once an attempt gave it back: ``queued`` with the attempt's problem in ``error``."""
    job = stack.index.get_job(job_id)
    return job if job.state is JobState.QUEUED and job.error is not None else None


def _disk_usage(files: dict[str, bytes]) -> int:
    return sum(-(-len(data) // PAGE) * PAGE for data in files.values())


def _check_resumed(stack: Stack, job_id: str, recorded: int, reference: dict[str, bytes]) -> JobRecord:
    """Attempt 2 succeeded over attempt 1's chunks: each skipped, the bundle identical, audit clean."""
    job = stack.index.get_job(job_id)
    assert job.state is JobState.SUCCEEDED and job.error is None, job
    assert job.attempts == 2 and job.result is not None
    resume = job.result["resume"]
    assert resume["chunks_recorded"] == recorded and resume["chunks_skipped"] == recorded, resume
    assert resume["chunks_rewritten"] == resume["chunks_changed"] == 0
    files = bundle_files(stack.store, job.store_url)
    assert bundle_differences(files, reference) == []
    audit = audit_chunks(stack.index, job, files)
    assert audit.clean and audit.rows == job.chunks_written == sum("/c/" in k for k in reference), audit
    return job


def test_disk_full_mid_job_gives_the_job_back_and_it_resumes_once_space_is_freed(
    env: Stack, reference: dict[str, dict[str, bytes]]
) -> None:
    usage = _disk_usage(reference[FULL])
    env.disk.fill(leave_bytes=usage // 2)  # the job's writes hit ENOSPC about half way
    started = time.monotonic()
    _submit(env, FULL, max_attempts=3)
    assert wait_until(lambda: _given_back(env, FULL) is not None, 60)
    given_back = time.monotonic() - started
    job = env.index.get_job(FULL)
    assert (job.state, job.attempts, job.lease_worker) == (JobState.QUEUED, 1, None)
    error = job.public_fields()["error"]  # what GET /v1/jobs/{id} shows
    assert error["type"] == "store-not-writable" and error["retrying"] is True, error
    assert (error["attempts"], error["max_attempts"]) == (1, 3)
    assert error["extra"]["errno"] == "ENOSPC" and error["extra"]["mount"] == str(env.disk.path)
    assert f"free space on {env.disk.path}" in error["detail"]
    recorded = job.chunks_written
    assert 0 < recorded < sum("/c/" in k for k in reference[FULL])  # mid-job
    env.disk.free()
    assert wait_until(lambda: env.index.get_job(FULL).terminal, 60)
    job = _check_resumed(env, FULL, recorded, reference[FULL])
    print(
        f"disk full: bundle {usage} B on disk, {usage // 2} B left free; attempt 1 given back after "
        f"{given_back:.1f} s with {recorded} chunks recorded; attempt 2 skipped {recorded}, "
        f"succeeded {time.monotonic() - started:.1f} s after submission; chunks={job.chunks_written}"
    )


def test_read_only_disk_gives_the_job_back_until_it_is_writable_again(
    env: Stack, reference: dict[str, dict[str, bytes]]
) -> None:
    env.disk.remount(read_only=True)
    started = time.monotonic()
    _submit(env, READ_ONLY, max_attempts=3)
    assert wait_until(lambda: _given_back(env, READ_ONLY) is not None, 60)
    job = env.index.get_job(READ_ONLY)
    error = job.error
    assert error is not None and error["type"] == "store-not-writable" and error["retrying"] is True
    assert error["extra"]["errno"] == "EROFS"
    assert f"remount {env.disk.path} read-write" in error["detail"]
    env.disk.remount(read_only=False)
    assert wait_until(lambda: env.index.get_job(READ_ONLY).terminal, 60)
    job = env.index.get_job(READ_ONLY)
    assert job.state is JobState.SUCCEEDED and job.error is None and job.attempts == 2, job
    files = bundle_files(env.store, job.store_url)
    assert bundle_differences(files, reference[READ_ONLY]) == []
    assert audit_chunks(env.index, job, files).clean
    print(f"read-only: succeeded {time.monotonic() - started:.1f} s after submission, 2 attempts")


def test_disk_full_on_every_attempt_fails_the_job_naming_the_disk_and_the_fix(env: Stack) -> None:
    env.disk.fill(leave_bytes=0)
    _submit(env, EXHAUSTED, max_attempts=2)
    assert wait_until(lambda: env.index.get_job(EXHAUSTED).terminal, 60)
    job = env.index.get_job(EXHAUSTED)
    assert job.state is JobState.FAILED and job.attempts == 2 and job.lease_worker is None, job
    problem = job.error
    assert problem is not None and problem["type"] == "store-not-writable" and "retrying" not in problem
    assert (problem["attempts"], problem["max_attempts"]) == (2, 2)
    detail = problem["detail"]
    assert "(ENOSPC)" in detail and job.store_url in detail  # which resource
    assert f"free space on {env.disk.path}" in detail and "submit the job again" in detail  # what to do
    assert problem["extra"]["resource"] == job.store_url
    print(f"attempts exhausted: {detail}")
