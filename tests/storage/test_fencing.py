"""Lease fencing in the SQL index (SQLite and PostgreSQL): every race of docs/reliability.md.

A claim never starts a second attempt beside a live one; a worker whose lease moved (or whose job
ended) can no longer report progress, record chunks, finish or give the job back.
"""

from __future__ import annotations

import threading

import pytest

from storage.errors import JobNotFound, JobStateConflict, LeaseLost
from storage.index import ChunkRecord, Index, JobRecord, JobState
from storage.index import reconcile as sql
from storage.index.models import utcnow


def _create(index: Index, max_attempts: int = 3) -> JobRecord:
    return index.create_job(
        spec={"model": {"id": "m"}, "prompts": ["hi"]},
        owner="alice",
        max_attempts=max_attempts,
        store_url_for=lambda job_id: f"/nowhere/{job_id}.zarr",
    )


def _chunk(n: int) -> ChunkRecord:
    return ChunkRecord("q", (n, 0), f"q/c/{n}/0", 10, "sha256:" + "0" * 64)


def _expire_and_requeue(index: Index, job_id: str) -> None:
    """What the reconciler does to a job whose worker stopped beating: back to queued, lease cleared."""
    (seen,) = [j for j in sql.expired_leases(index, beat_before=utcnow()) if j.id == job_id]
    assert sql.requeue_expired(index, seen, utcnow())


def test_duplicate_delivery_of_a_running_job_does_not_start_a_second_attempt(index: Index) -> None:
    job = _create(index)
    first = index.claim(job.id, "w1", lease_timeout_s=60)
    assert first is not None and first.attempts == 1
    assert index.claim(job.id, "w2", lease_timeout_s=60) is None  # w1's lease is fresh
    row = index.get_job(job.id)
    assert (row.state, row.lease_worker, row.attempts) == (JobState.RUNNING, "w1", 1)
    # the same worker taking its own job again (its earlier attempt ended without finishing) may
    again = index.claim(job.id, "w1", lease_timeout_s=60)
    assert again is not None and again.attempts == 2 and again.lease_worker == "w1"


def test_duplicate_delivery_during_the_last_attempt_leaves_it_running(index: Index) -> None:
    job = _create(index, max_attempts=1)
    assert index.claim(job.id, "w1", lease_timeout_s=60) is not None
    assert index.claim(job.id, "w2", lease_timeout_s=60) is None  # not "attempts exhausted"
    assert index.get_job(job.id).state is JobState.RUNNING
    index.finish(job.id, JobState.SUCCEEDED, worker="w1")
    assert index.get_job(job.id).state is JobState.SUCCEEDED


def test_duplicate_delivery_while_cancelling_leaves_the_cancel_to_the_live_worker(index: Index) -> None:
    job = _create(index)
    index.claim(job.id, "w1", lease_timeout_s=60)
    index.request_cancel(job.id)
    assert index.claim(job.id, "w2", lease_timeout_s=60) is None
    assert index.get_job(job.id).state is JobState.CANCELLING
    index.record_chunks(job.id, [_chunk(0)], worker="w1")  # the live worker flushes its last chunk
    done = index.finish(job.id, JobState.CANCELLED, partial=True, worker="w1")
    assert done.state is JobState.CANCELLED and done.chunks_written == 1


def test_concurrent_duplicate_claims_start_exactly_one_attempt(index: Index) -> None:
    job = _create(index, max_attempts=5)
    barrier = threading.Barrier(6)
    results: list[JobRecord | None] = []

    def claim(n: int) -> None:
        barrier.wait()
        results.append(index.claim(job.id, f"w{n}", lease_timeout_s=60))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [r for r in results if r is not None]
    assert len(claimed) == 1 and claimed[0].attempts == 1
    assert index.get_job(job.id).attempts == 1


def test_stale_worker_cannot_write_after_its_lease_moved(index: Index) -> None:
    """w1 stalls past the lease timeout; the reconciler requeues the job and w2 claims it. When w1
    wakes up, each of its writes raises LeaseLost and changes nothing."""
    job = _create(index)
    index.claim(job.id, "w1", lease_timeout_s=60)
    index.record_chunks(job.id, [_chunk(0)], worker="w1")
    _expire_and_requeue(index, job.id)
    with pytest.raises(LeaseLost, match="w1 lost its lease"):  # queued, nobody holds it yet
        index.record_chunks(job.id, [_chunk(1)], worker="w1")
    assert index.claim(job.id, "w2", lease_timeout_s=60) is not None
    before = index.get_job(job.id)
    with pytest.raises(LeaseLost, match="lease held by w2"):
        index.update_progress(job.id, units_done=99, phase="decoding", worker="w1")
    with pytest.raises(LeaseLost):
        index.record_chunks(job.id, [_chunk(1), _chunk(2)], worker="w1")
    with pytest.raises(LeaseLost):
        index.finish(job.id, JobState.SUCCEEDED, result={"from": "w1"}, worker="w1")
    with pytest.raises(LeaseLost):
        index.release(job.id, "w1")
    assert index.heartbeat(job.id, "w1") is False
    after = index.get_job(job.id)
    assert after == before  # nothing changed: state, lease, progress, chunks, result
    assert [c.coords for c in index.list_chunks(job.id)] == [(0, 0)]
    # the holder goes on
    assert index.heartbeat(job.id, "w2") is True
    assert index.update_progress(job.id, units_done=1, worker="w2") is False
    index.record_chunks(job.id, [_chunk(1)], worker="w2")
    assert index.finish(job.id, JobState.SUCCEEDED, worker="w2").chunks_written == 2


def test_worker_cannot_write_after_the_job_ended(index: Index) -> None:
    """The reconciler ended the job (cancel requested, lease expired) while its worker stalled."""
    job = _create(index)
    index.claim(job.id, "w1", lease_timeout_s=60)
    index.request_cancel(job.id)
    (seen,) = sql.expired_leases(index, beat_before=utcnow())
    assert sql.end_expired(index, seen, JobState.CANCELLED, utcnow())
    with pytest.raises(LeaseLost, match="cancelled"):
        index.finish(job.id, JobState.CANCELLED, partial=True, worker="w1")
    with pytest.raises(LeaseLost):
        index.update_progress(job.id, units_done=1, worker="w1")
    assert index.get_job(job.id).state is JobState.CANCELLED
    with pytest.raises(JobNotFound):
        index.update_progress("no-such-job", units_done=1, worker="w1")


def test_lease_lost_is_a_state_conflict_with_a_problem_document(index: Index) -> None:
    job = _create(index)
    with pytest.raises(JobStateConflict) as caught:
        index.finish(job.id, JobState.FAILED, worker="w1")  # queued: nobody's lease
    problem = caught.value.to_problem()
    assert problem["type"] == "lease-lost" and problem["extra"]["lease_worker"] is None


def test_api_side_callers_are_not_fenced(index: Index) -> None:
    job = _create(index)
    index.claim(job.id, "w1", lease_timeout_s=60)
    assert index.update_progress(job.id, units_done=3) is False
    index.record_chunks(job.id, [_chunk(0)])
    assert index.request_cancel(job.id).state is JobState.CANCELLING
    assert index.finish(job.id, JobState.CANCELLED, partial=True).state is JobState.CANCELLED


def test_release_gives_the_job_back_for_the_next_attempt(index: Index) -> None:
    job = _create(index)
    index.claim(job.id, "w1", lease_timeout_s=60)
    assert index.release(job.id, "w1") is JobState.QUEUED
    row = index.get_job(job.id)
    assert (row.state, row.lease_worker, row.heartbeat_at, row.attempts) == (JobState.QUEUED, None, None, 1)
    again = index.claim(job.id, "w2", lease_timeout_s=60)
    assert again is not None and again.attempts == 2
    index.request_cancel(job.id)
    assert index.release(job.id, "w2") is JobState.CANCELLED  # a cancel requested meanwhile wins
