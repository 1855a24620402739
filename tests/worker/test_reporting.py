"""worker/reporting.py against a real SQLite index: the forward thread's calls never wait on SQL,
records reach the index in batches from the reporter thread, a failed batch is kept and written on
the next tick, and cancel and lease loss arrive as flags."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from storage.bundle.records import ChunkRecord
from storage.errors import JobCancelled, LeaseLost
from storage.index import Index, JobState
from worker.reporting import JobReporter, ReportIntervals

WORKER = "w1"
FAST = (0.05, 0.05, 0.05)  # heartbeat, progress, record intervals in seconds


class GatedIndex(Index):
    """A real index whose writes of a running job wait on ``gate`` (a locked or slow database)."""

    gate = threading.Event()
    fail_records = 0  # the next N record_chunks calls raise, as a dropped connection would

    def record_chunks(self, job_id: str, chunks: Sequence[ChunkRecord], *, worker: str | None = None) -> None:
        self.gate.wait()
        if self.fail_records:
            self.fail_records -= 1
            raise ConnectionError("server closed the connection unexpectedly")
        super().record_chunks(job_id, chunks, worker=worker)

    def update_progress(self, job_id: str, **progress: Any) -> bool:
        self.gate.wait()
        return super().update_progress(job_id, **progress)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[GatedIndex, str]]:
    index = GatedIndex(f"sqlite:///{tmp_path}/index.db")
    index.migrate()
    index.gate = threading.Event()
    index.gate.set()
    job = index.create_job(
        spec={"model": {"id": "m"}, "prompts": ["x"]},
        owner="alice",
        store_url_for=lambda job_id: str(tmp_path / job_id),
        max_attempts=2,
    )
    assert index.claim(job.id, WORKER, lease_timeout_s=60) is not None
    yield index, job.id
    index.gate.set()
    index.dispose()


def _reporter(index: Index, job_id: str) -> JobReporter:
    return JobReporter(index, job_id, WORKER, ReportIntervals(*FAST))


def _record(i: int) -> ChunkRecord:
    return ChunkRecord("q", (0, 0, 0, i, 0), f"q/c/0/0/0/{i}/0", 10, "crc32c:00000000")


def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_forward_thread_calls_return_while_the_database_is_stuck(running: tuple[GatedIndex, str]) -> None:
    index, job_id = running
    index.gate.clear()  # every write of the job now waits
    with _reporter(index, job_id) as reporter:
        time.sleep(0.2)  # the reporter thread is now stuck in a write
        t0 = time.perf_counter()
        reporter.phase("prefill", units_total=10)
        for i in range(200):
            reporter.unit_done()
            reporter.chunk_stored(_record(i))
            reporter.check_cancelled()
        spent_s = time.perf_counter() - t0
        assert spent_s < 0.5, f"the forward thread waited {spent_s:.2f} s on a stuck database"
        assert index.get_job(job_id).chunks_written == 0
        index.gate.set()
        assert _until(lambda: index.get_job(job_id).chunks_written == 200)
        assert _until(lambda: index.get_job(job_id).units_done == 200)
        job = index.get_job(job_id)
        assert (job.phase, job.units_total) == ("prefill", 10)


def test_a_failed_record_batch_is_kept_and_written_on_the_next_tick(running: tuple[GatedIndex, str]) -> None:
    index, job_id = running
    index.fail_records = 2
    with _reporter(index, job_id) as reporter:
        for i in range(5):
            reporter.chunk_stored(_record(i))
        assert _until(lambda: index.get_job(job_id).chunks_written == 5)
    assert index.fail_records == 0
    assert sorted(r.key for r in index.list_chunks(job_id)) == sorted(_record(i).key for i in range(5))


def test_flush_writes_what_is_queued_from_the_calling_thread(running: tuple[GatedIndex, str]) -> None:
    index, job_id = running
    slow = ReportIntervals(heartbeat_interval_s=60, progress_interval_s=60, record_interval_s=60)
    with JobReporter(index, job_id, WORKER, slow) as reporter:
        reporter.chunk_stored(_record(0))
        reporter.unit_done()
        assert index.get_job(job_id).chunks_written == 0  # the thread writes once a minute
    reporter.flush()
    job = index.get_job(job_id)
    assert (job.chunks_written, job.units_done) == (1, 1)


def test_cancel_and_lease_loss_arrive_as_flags(running: tuple[GatedIndex, str]) -> None:
    index, job_id = running
    with _reporter(index, job_id) as reporter:
        reporter.check_cancelled()
        index.request_cancel(job_id, owner="alice")
        assert _until(lambda: reporter.cancel_requested.is_set())
        with pytest.raises(JobCancelled):
            reporter.check_cancelled()
    index.finish(job_id, JobState.CANCELLED, partial=False, worker=WORKER)
    with _reporter(index, job_id) as reporter:  # the job ended: the next fenced write is refused
        reporter.unit_done()
        assert _until(lambda: reporter.lease_lost.is_set())
        with pytest.raises(LeaseLost):
            reporter.check_cancelled()


def test_records_written_returns_once_the_thread_wrote_every_queued_record(
    running: tuple[GatedIndex, str],
) -> None:
    index, job_id = running
    slow = ReportIntervals(heartbeat_interval_s=60, progress_interval_s=60, record_interval_s=60)
    index.fail_records = 1  # the first batch fails (a dropped connection): kept and written again
    with JobReporter(index, job_id, WORKER, slow) as reporter:
        for i in range(3):
            reporter.chunk_stored(_record(i))
        index.gate.clear()  # the database is stuck: records_written waits for it
        done = threading.Event()

        def wait_for_records() -> None:
            reporter.records_written()
            done.set()

        waiter = threading.Thread(target=wait_for_records)
        waiter.start()
        assert not done.wait(0.3) and index.get_job(job_id).chunks_written == 0
        index.gate.set()  # written by the thread (which alone would wait a minute), the failed
        assert done.wait(10)  # batch asked for again
        waiter.join()
        assert index.get_job(job_id).chunks_written == 3
        assert index.fail_records == 0


def test_records_written_raises_once_the_lease_is_lost(running: tuple[GatedIndex, str]) -> None:
    index, job_id = running
    index.finish(job_id, JobState.CANCELLED, partial=False, worker=WORKER)
    with _reporter(index, job_id) as reporter:
        reporter.chunk_stored(_record(0))
        with pytest.raises(LeaseLost):
            reporter.records_written()
