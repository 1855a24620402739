"""Database faults mid-job on a SQLite index (docs/reliability.md, "Database faults"): the job runs
in this process (``run_job`` in a thread, as the Celery task calls it) with a tiny model and a local
store; the fault comes from outside the index code:

- another connection holds SQLite's write lock for 13 s, longer than the 10 s busy timeout (the
  issue's case): the job succeeds in its first attempt;
- the database file cannot be opened for writing for 3 s, the pool opening its connections then:
  the job succeeds in its first attempt (no connection stays read-only);
- the lock outlives the worker's retry budget: the attempt gives the job back (or leaves it to
  its lease), the next attempt resumes by chunk.

Every bundle is compared with an uninterrupted run of the same job; every chunk row is audited.
(A PostgreSQL server stopped and restarted under a real worker process:
tests/worker/test_postgres_faults.py.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from storage.errors import IndexUnavailable
from storage.index import Index, JobState
from storage.index.retry import IndexRetry
from storage.stores.objectstore import ObjectStore
from tests.db_faults import read_only_file, read_only_unavailable, write_lock
from tests.faults import audit_chunks, bundle_differences, bundle_files, wait_until
from tests.soak import job_spec
from worker.jobs import run_job
from worker.models import ModelCache
from worker.reporting import JobReporter
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

LOCKED = "00000000-0000-4000-8000-0000000000d1"
READ_ONLY = "00000000-0000-4000-8000-0000000000d2"
RESUMED = "00000000-0000-4000-8000-0000000000d3"
GIVEN_BACK = "00000000-0000-4000-8000-0000000000d4"
JOBS = (LOCKED, READ_ONLY, RESUMED, GIVEN_BACK)

pytestmark = pytest.mark.slow


def _spec(model: Path, n: int) -> dict[str, Any]:
    """The soak's job with 96 new tokens (194 layer passes, 395 chunks; about 0.5 s on 2 cores)."""
    spec = job_spec(model, n)
    spec["generation"]["max_new_tokens"] = 96
    return spec


def _settings(root: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{root}/index.db",
        "store_url": str(root / "store"),
        "progress_interval_s": 0.0,
        "heartbeat_interval_s": 0.2,
        "record_interval_s": 0.0,
        "model_cache_dir": model_cache_dir(),
        **overrides,
    }
    return WorkerSettings(**values)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs of the jobs below, under the same ids."""
    root = tmp_path_factory.mktemp("db-reference")
    settings = _settings(root)
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    models = ModelCache(model_cache_dir(), "cpu")
    out = {}
    for n, job_id in enumerate(JOBS):
        spec = _spec(tiny_model_dir("llama"), n)
        index.create_job(
            spec=spec, owner="alice", store_url_for=store.bundle_url, max_attempts=1, job_id=job_id
        )
        run_job(job_id, index=index, store=store, models=models, settings=settings, worker_id="reference")
        out[job_id] = bundle_files(store, index.get_job(job_id).store_url)
    index.dispose()
    return out


class Pause:
    """The running job's forward thread waits at its ``units``-th layer pass (of 194) until
    :meth:`resume`: the test puts the fault in place while the job is certainly mid-job."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, units: int = 40) -> None:
        self.reached, self._go = threading.Event(), threading.Event()
        check = JobReporter.check_cancelled

        def paused(reporter: JobReporter) -> None:
            if reporter.units_done >= units and not self._go.is_set():
                self.reached.set()
                self._go.wait(60)
            check(reporter)

        monkeypatch.setattr(JobReporter, "check_cancelled", paused)

    def wait(self) -> None:
        assert self.reached.wait(60), "the job never reached the pause"

    def resume(self) -> None:
        self._go.set()


class Stack:
    """The worker's index (with the settings' retry budget), store and model cache in ``root``."""

    def __init__(self, root: Path, **overrides: Any) -> None:
        self.settings = _settings(root, **overrides)
        self.db = root / "index.db"
        self.index = Index(self.settings.database_url, retry=IndexRetry(budget_s=self.settings.db_retry_s))
        self.index.migrate()
        self.store = ObjectStore.from_settings(self.settings)
        self.models = ModelCache(model_cache_dir(), "cpu")

    def submit(self, job_id: str, spec: dict[str, Any], max_attempts: int = 3) -> None:
        self.index.create_job(
            spec=spec,
            owner="alice",
            store_url_for=self.store.bundle_url,
            max_attempts=max_attempts,
            job_id=job_id,
        )

    def run(self, job_id: str, worker: str = "w1") -> tuple[threading.Thread, list[JobState | None]]:
        outcome: list[JobState | None] = []

        def target() -> None:
            outcome.append(
                run_job(
                    job_id,
                    index=self.index,
                    store=self.store,
                    models=self.models,
                    settings=self.settings,
                    worker_id=worker,
                )
            )

        thread = threading.Thread(target=target, name=f"job-{job_id[-2:]}")
        thread.start()
        return thread, outcome

    def running_with_chunks(self, job_id: str, n: int) -> bool:
        job = self.index.get_job(job_id)
        return job.state is JobState.RUNNING and job.chunks_written >= n

    def check_bundle(self, job_id: str, reference: dict[str, bytes]) -> None:
        job = self.index.get_job(job_id)
        files = bundle_files(self.store, job.store_url)
        assert bundle_differences(files, reference) == []
        audit = audit_chunks(self.index, job, files)
        assert audit.clean and audit.rows == job.chunks_written == sum("/c/" in k for k in reference), audit


def test_write_lock_held_past_the_busy_timeout_mid_job(
    tmp_path: Path,
    reference: dict[str, dict[str, bytes]],
    tiny_model_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack(tmp_path, db_retry_s=60.0)
    stack.submit(LOCKED, _spec(tiny_model_dir("llama"), 0))
    pause = Pause(monkeypatch)
    thread, outcome = stack.run(LOCKED)
    pause.wait()
    start = time.monotonic()
    with write_lock(stack.db):  # the case: 13 s, longer than SQLite's 10 s busy timeout
        pause.resume()
        time.sleep(13.0)
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    job = stack.index.get_job(LOCKED)
    assert job.attempts == 1 and job.error is None
    stack.check_bundle(LOCKED, reference[LOCKED])
    stats = stack.index.retry_stats
    assert stats.retried >= 1 and stats.unavailable == 0
    print(f"lock 13 s: succeeded attempts=1 in {time.monotonic() - start:.1f} s from the lock; {stats}")


def test_database_file_read_only_for_a_while_mid_job(
    tmp_path: Path,
    reference: dict[str, dict[str, bytes]],
    tiny_model_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if reason := read_only_unavailable(tmp_path):
        pytest.skip(f"cannot make the database file read-only here: {reason}")
    stack = Stack(tmp_path, db_retry_s=60.0)
    stack.submit(READ_ONLY, _spec(tiny_model_dir("llama"), 1))
    pause = Pause(monkeypatch)
    thread, outcome = stack.run(READ_ONLY)
    pause.wait()
    with read_only_file(stack.db):
        stack.index.dispose()  # the pool opens its connections during the fault: all read-only
        pause.resume()
        time.sleep(3.0)
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    job = stack.index.get_job(READ_ONLY)
    assert job.attempts == 1 and job.error is None
    stack.check_bundle(READ_ONLY, reference[READ_ONLY])
    stats = stack.index.retry_stats
    assert stats.discarded >= 1 and stats.unavailable == 0
    print(f"read-only 3 s: succeeded attempts=1; {stats}")


def test_an_outage_past_the_retry_budget_gives_the_job_back_and_the_next_attempt_resumes(
    tmp_path: Path,
    reference: dict[str, dict[str, bytes]],
    tiny_model_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack(tmp_path, db_retry_s=1.0, lease_timeout_s=2.0)
    stack.submit(RESUMED, _spec(tiny_model_dir("llama"), 2))
    pause = Pause(monkeypatch)
    thread, outcome = stack.run(RESUMED)
    pause.wait()
    assert wait_until(lambda: stack.running_with_chunks(RESUMED, 1), 10)
    start = time.monotonic()
    with write_lock(stack.db):  # until the attempt ends: its last writes and its give-back time out
        pause.resume()
        thread.join(120)
    held = time.monotonic() - start
    first = stack.index.get_job(RESUMED)
    assert outcome == [None]  # left to its lease: the reconciler would queue it again
    assert first.state is JobState.RUNNING and first.lease_worker == "w1" and first.attempts == 1
    recorded = first.chunks_written
    assert recorded > 0
    time.sleep(stack.settings.lease_timeout_s)  # the lease expires; the next claim takes the job over
    thread, outcome = stack.run(RESUMED, worker="w2")
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    job = stack.index.get_job(RESUMED)
    assert job.attempts == 2 and job.error is None
    assert job.result is not None
    resume = job.result["resume"]
    assert resume["chunks_recorded"] == recorded and resume["chunks_skipped"] == recorded
    assert resume["chunks_rewritten"] == resume["chunks_changed"] == 0
    stack.check_bundle(RESUMED, reference[RESUMED])
    print(f"lock {held:.1f} s > budget 1 s: attempt 1 left to its lease, attempt 2 skipped {recorded} chunks")


def test_an_index_unavailable_at_the_end_of_the_attempt_gives_the_job_back(
    tmp_path: Path,
    reference: dict[str, dict[str, bytes]],
    tiny_model_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = Stack(tmp_path, db_retry_s=1.0)
    stack.submit(GIVEN_BACK, _spec(tiny_model_dir("llama"), 3))
    finish = Index.finish

    def unavailable(self: Index, *args: Any, **kwargs: Any) -> Any:
        raise IndexUnavailable("the index database is unavailable: injected", retry_after_s=1)

    def unavailable_once(self: Index, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(Index, "finish", finish)
        return unavailable(self)

    monkeypatch.setattr(Index, "claim", unavailable)
    thread, outcome = stack.run(GIVEN_BACK)
    thread.join(120)
    assert outcome == [JobState.QUEUED]  # not claimed: sent again after retry_delay_s, untouched
    assert stack.index.get_job(GIVEN_BACK).attempts == 0
    monkeypatch.undo()
    monkeypatch.setattr(Index, "finish", unavailable_once)
    thread, outcome = stack.run(GIVEN_BACK)
    thread.join(120)
    assert outcome == [JobState.QUEUED]  # given back: never failed for a database outage
    job = stack.index.get_job(GIVEN_BACK)
    assert job.state is JobState.QUEUED and job.lease_worker is None and job.attempts == 1
    assert (
        job.error is not None and job.error["type"] == "index-unavailable" and job.error["retrying"] is True
    )
    thread, outcome = stack.run(GIVEN_BACK, worker="w2")
    thread.join(120)
    assert outcome == [JobState.SUCCEEDED]
    job = stack.index.get_job(GIVEN_BACK)
    assert job.attempts == 2 and job.error is None and job.result is not None
    assert job.result["resume"]["chunks_skipped"] == job.chunks_written  # resumed by chunk
    stack.check_bundle(GIVEN_BACK, reference[GIVEN_BACK])
