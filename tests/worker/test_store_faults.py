"""Object-store faults mid-job: an S3 server (moto) behind a fault-injecting HTTP proxy
(``tests.faults.FaultyProxy``) that answers 503 or drops connections for a while, or for good.

The job runs in this process against a real SQLite index; every store operation goes over HTTP
through the proxy. Writes must be retried (no torn or missing chunk, the bundle identical to an
uninterrupted run); an outage longer than the retry budget gives the job back, the next attempt
resumes by chunk; on the last attempt the job fails with a clear problem document.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.index import Index, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import FaultyProxy, audit_chunks, bundle_differences, bundle_files
from tests.services import S3Server
from tests.soak import job_spec
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

RETRIED = "00000000-0000-4000-8000-0000000000a1"
RESUMED = "00000000-0000-4000-8000-0000000000a2"
FAILED = "00000000-0000-4000-8000-0000000000a3"

pytestmark = pytest.mark.slow


def _spec(model: Path, n: int) -> dict[str, Any]:
    spec = job_spec(model, n)
    spec["generation"]["max_new_tokens"] = 10
    return spec


def _settings(root: Path, store_url: str, retry_s: float) -> WorkerSettings:
    return WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=store_url,
        progress_interval_s=0.0,
        heartbeat_interval_s=0.2,
        model_cache_dir=model_cache_dir(),
        store_retry_s=retry_s,
    )


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs (local store) of the jobs below, under the same ids."""
    root = tmp_path_factory.mktemp("s3-reference")
    settings = _settings(root, str(root / "store"), 0)
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    out = {}
    for n, job_id in enumerate((RETRIED, RESUMED)):
        spec = _spec(tiny_model_dir("llama"), n)
        index.create_job(
            spec=spec, owner="alice", store_url_for=store.bundle_url, max_attempts=1, job_id=job_id
        )
        models = ModelCache(model_cache_dir(), "cpu")
        run_job(job_id, index=index, store=store, models=models, settings=settings, worker_id="reference")
        out[job_id] = bundle_files(store, index.get_job(job_id).store_url)
    index.dispose()
    return out


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_server.endpoint_url) as p:
        yield p


@pytest.fixture
def env(s3_server: S3Server, proxy: FaultyProxy, tmp_path: Path) -> dict[str, Any]:
    # botocore's own retries off (each try is one request through the proxy); s3fs and
    # storage.stores.objectstore.StoreRetry retry what fails
    options = {
        **s3_server.storage_options(),
        "endpoint_url": proxy.endpoint_url,
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    store = ObjectStore(root_url=s3_server.new_store_url(), storage_options=options)
    index = Index(f"sqlite:///{tmp_path}/index.db")
    index.migrate()
    return {"index": index, "store": store, "root": tmp_path, "models": ModelCache(model_cache_dir(), "cpu")}


def _submit(env: dict[str, Any], job_id: str, spec: dict[str, Any], max_attempts: int) -> None:
    env["index"].create_job(
        spec=spec,
        owner="alice",
        store_url_for=env["store"].bundle_url,
        max_attempts=max_attempts,
        job_id=job_id,
    )


def _run_in_thread(env: dict[str, Any], job_id: str, retry_s: float) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []
    settings = _settings(env["root"], env["store"].root_url, retry_s)

    def target() -> None:
        outcome.append(
            run_job(
                job_id,
                index=env["index"],
                store=env["store"],
                models=env["models"],
                settings=settings,
                worker_id="w1",
            )
        )

    thread = threading.Thread(target=target, name=f"job-{job_id[-2:]}")
    thread.start()
    return thread, outcome


def _check_bundle(env: dict[str, Any], job_id: str, reference: dict[str, bytes]) -> None:
    job = env["index"].get_job(job_id)
    files = bundle_files(env["store"], job.store_url)
    assert bundle_differences(files, reference) == []
    audit = audit_chunks(env["index"], job, files)
    assert audit.clean and audit.rows == job.chunks_written == sum("/c/" in k for k in reference), audit


def _mid_job(reference: dict[str, bytes]) -> int:
    """Writes before a fault: half of an uninterrupted run's files (each one write at least), so
    the fault comes mid-job whatever the machine's speed."""
    return len(reference) // 2


def test_5xx_errors_and_an_outage_mid_job_are_retried(
    env: dict[str, Any], proxy: FaultyProxy, reference: dict[str, dict[str, bytes]], tiny_model_dir: Any
) -> None:
    _submit(env, RETRIED, _spec(tiny_model_dir("llama"), 0), max_attempts=1)
    # three requests answered 503 ServiceUnavailable, then three connections closed unanswered
    proxy.schedule(_mid_job(reference[RETRIED]), [("5xx", 3), ("down", 3)])
    thread, outcome = _run_in_thread(env, RETRIED, retry_s=60)
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    assert (proxy.stats.failed_5xx, proxy.stats.dropped) == (3, 3)
    job = env["index"].get_job(RETRIED)
    assert job.attempts == 1 and job.error is None
    _check_bundle(env, RETRIED, reference[RETRIED])


def test_outage_past_the_retry_budget_gives_the_job_back_and_the_next_attempt_resumes(
    env: dict[str, Any], proxy: FaultyProxy, reference: dict[str, dict[str, bytes]], tiny_model_dir: Any
) -> None:
    _submit(env, RESUMED, _spec(tiny_model_dir("llama"), 1), max_attempts=2)
    proxy.schedule(_mid_job(reference[RESUMED]), [("down", None)])  # the server gone for good
    thread, outcome = _run_in_thread(env, RESUMED, retry_s=1.0)
    thread.join(120)
    assert outcome == [JobState.QUEUED]  # given back: the worker re-enqueues it after retry_delay_s
    given_back = env["index"].get_job(RESUMED)
    assert (given_back.state, given_back.lease_worker, given_back.attempts) == (JobState.QUEUED, None, 1)
    recorded = given_back.chunks_written
    assert 0 < recorded < sum("/c/" in k for k in reference[RESUMED])
    proxy.heal()
    thread, outcome = _run_in_thread(env, RESUMED, retry_s=1.0)
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    job = env["index"].get_job(RESUMED)
    assert job.attempts == 2
    resume = job.result["resume"]
    assert resume["chunks_recorded"] == recorded and resume["chunks_skipped"] == recorded
    assert resume["chunks_rewritten"] == resume["chunks_changed"] == 0
    _check_bundle(env, RESUMED, reference[RESUMED])


def test_outage_on_the_last_attempt_fails_the_job_with_a_problem_document(
    env: dict[str, Any], proxy: FaultyProxy, reference: dict[str, dict[str, bytes]], tiny_model_dir: Any
) -> None:
    _submit(env, FAILED, _spec(tiny_model_dir("llama"), 2), max_attempts=1)
    proxy.schedule(_mid_job(reference[RETRIED]), [("5xx", None)])  # job 2 is job 0's shape
    thread, outcome = _run_in_thread(env, FAILED, retry_s=1.0)
    thread.join(120)
    assert outcome == [JobState.FAILED]
    job = env["index"].get_job(FAILED)
    assert job.state is JobState.FAILED and job.partial and job.lease_worker is None
    problem = job.error
    assert problem is not None and problem["type"] == "store-unavailable"
    assert (problem["attempts"], problem["max_attempts"]) == (1, 1)
    assert "retry budget 1 s" in problem["detail"] and "QKVAULT_STORE_RETRY_S" in problem["detail"]
    # what was recorded before the outage is intact in the store (no torn chunk)
    proxy.heal()
    files = bundle_files(env["store"], job.store_url)
    audit = audit_chunks(env["index"], job, files)
    assert not audit.orphan_rows and not audit.bad_checksums and not audit.duplicate_rows
