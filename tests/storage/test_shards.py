"""job_shards in the SQL index (SQLite and PostgreSQL): per-shard leases, fencing, attempt caps,
progress summed into the job, a failed shard or a cancel stopping every shard before the finalize
ends the job, and the reconciler's transitions (storage/index/shards.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from storage.bundle.records import ChunkRecord
from storage.errors import LeaseLost
from storage.index import Index, JobState
from storage.index import reconcile as job_reconcile
from storage.index import shards as sh
from storage.index.models import utcnow

PLANS = [
    sh.ShardPlan(first_window=0, window_first_batch=0, first_batch=0, batches=3, units_total=10,
                 tokens_planned=100, padded_tokens=110),
    sh.ShardPlan(first_window=0, window_first_batch=0, first_batch=3, batches=2, units_total=6,
                 tokens_planned=60, padded_tokens=64),
]  # fmt: skip


def _sharded(index: Index, max_attempts: int = 2) -> str:
    job = index.create_job(
        spec={"model": "tiny"}, owner="alice", store_url_for=lambda i: f"file:///b/{i}", max_attempts=3
    )
    assert index.claim(job.id, "planner") is not None
    shards = sh.create_shards(index, job.id, PLANS, worker="planner", max_attempts=max_attempts)
    assert [s.state for s in shards] == ["queued", "queued"]
    return job.id


def _fresh_job(index: Index) -> str:
    job = index.create_job(spec={}, owner="bob", store_url_for=lambda i: f"file:///b/{i}", max_attempts=3)
    assert index.claim(job.id, "planner") is not None
    return job.id


def _chunk(array: str) -> ChunkRecord:
    return ChunkRecord(array=array, coords=(0,), key=f"{array}/c/0", nbytes=7, checksum="crc32c:00000000")


def test_shards_are_created_once_and_the_job_is_leased_to_its_shards(index: Index) -> None:
    job_id = _sharded(index)
    job = index.get_job(job_id)
    assert job.lease_worker == sh.SHARDED_LEASE and job.units_total == 16 and job.tokens_total == 160
    again = sh.create_shards(index, job_id, PLANS[:1], worker="someone", max_attempts=5)
    assert len(again) == 2 and again[0].max_attempts == 2  # the stored plan stays
    # the job-level reconciler leaves a sharded job to the shard pass, however old its beat
    assert job_reconcile.expired_leases(index, beat_before=utcnow() + timedelta(hours=1)) == []
    with pytest.raises(LeaseLost):
        other = index.create_job(spec={}, owner="a", store_url_for=lambda i: i, max_attempts=1)
        sh.create_shards(index, other.id, PLANS, worker="nobody", max_attempts=1)


def test_claim_fences_progress_sums_and_finalize_waits_for_every_shard(index: Index) -> None:
    job_id = _sharded(index)
    a = sh.claim_shard(index, job_id, 0, "w1", lease_timeout_s=60)
    assert a is not None and a.attempts == 1 and a.lease_worker == "w1"
    assert sh.claim_shard(index, job_id, 0, "w2", lease_timeout_s=60) is None  # live lease: duplicate
    assert sh.claim_shard(index, job_id, 1, "w2", lease_timeout_s=60) is not None
    assert sh.shard_progress(index, job_id, 0, units_done=4, tokens_done=40, worker="w1") is False
    sh.shard_progress(index, job_id, 1, units_done=2, tokens_done=20, worker="w2")
    job = index.get_job(job_id)
    assert (job.units_done, job.tokens_done) == (6, 60)
    with pytest.raises(LeaseLost):
        sh.shard_progress(index, job_id, 0, units_done=9, tokens_done=0, worker="w2")
    with pytest.raises(LeaseLost):
        sh.record_shard_chunks(index, job_id, 1, [_chunk("batches/000003/tokens")], worker="w1")
    sh.record_shard_chunks(index, job_id, 0, [_chunk("batches/000000/tokens")], worker="w1")
    sh.record_shard_chunks(index, job_id, 1, [_chunk("batches/000003/tokens")], worker="w2")
    assert index.get_job(job_id).chunks_written == 2
    assert sh.shard_heartbeat(index, job_id, 0, "w1") and not sh.shard_heartbeat(index, job_id, 0, "w2")
    assert sh.finish_shard(index, job_id, 0, "succeeded", worker="w1") is False
    assert sh.claim_finalize(index, job_id, "f", lease_timeout_s=60) is None  # shard 1 still runs
    assert sh.finish_shard(index, job_id, 1, "succeeded", worker="w2") is True
    with pytest.raises(LeaseLost):  # a stale attempt of a finished shard changes nothing
        sh.shard_progress(index, job_id, 1, units_done=0, tokens_done=0, worker="w2")
    assert sh.unfinalized(index, untouched_since=utcnow() + timedelta(seconds=1)) == [job_id]
    final = sh.claim_finalize(index, job_id, "f", lease_timeout_s=60)
    assert final is not None and final.lease_worker == "f" and final.phase == "finalizing"
    assert sh.claim_finalize(index, job_id, "g", lease_timeout_s=60) is None  # f's lease is live
    index.finish(job_id, JobState.SUCCEEDED, worker="f")
    assert [s.last_worker for s in sh.list_shards(index, job_id)] == ["w1", "w2"]


def test_a_failed_shard_stops_the_others_then_the_finalize_fails_the_job(index: Index) -> None:
    job_id = _sharded(index)  # another sharded job: not stopped by this one's failure
    other = _fresh_job(index)
    sh.create_shards(index, other, [*PLANS, PLANS[1]], worker="planner", max_attempts=2)  # shard 2 queued
    for shard, worker in ((0, "w1"), (1, "w2")):
        assert sh.claim_shard(index, other, shard, worker, lease_timeout_s=60)
    problem = {"type": "internal-error", "title": "Boom", "detail": "boom", "shard": 0}
    assert sh.finish_shard(index, other, 0, "failed", worker="w1", error=problem) is False
    job = index.get_job(other)
    assert job.state is JobState.RUNNING and job.error == problem and job.phase == "stopping"
    assert [s.state for s in sh.list_shards(index, other)] == ["failed", "running", "cancelled"]
    assert sh.is_stopping(index, other) and not sh.is_stopping(index, job_id)
    assert sh.shard_progress(index, other, 1, units_done=1, tokens_done=1, worker="w2") is True
    assert not sh.finalize_due(index, other)
    assert sh.claim_finalize(index, other, "f", lease_timeout_s=60) is None  # shard 1 still runs
    assert sh.finish_shard(index, other, 1, "cancelled", worker="w2") is True  # the last to stop
    assert sh.finalize_due(index, other)
    assert sh.unfinalized(index, untouched_since=utcnow() + timedelta(seconds=1)) == [other]
    final = sh.claim_finalize(index, other, "f", lease_timeout_s=60)
    assert final is not None and final.phase == "finalizing" and not final.cancel_requested
    index.finish(other, JobState.FAILED, error=problem, partial=True, worker="f")
    assert not sh.finalize_due(index, other)


def test_cancel_stops_every_shard_and_the_finalize_ends_the_job_once_none_runs(index: Index) -> None:
    job_id = _sharded(index)
    assert sh.claim_shard(index, job_id, 0, "w1", lease_timeout_s=60)
    index.request_cancel(job_id)
    assert sh.shard_progress(index, job_id, 0, units_done=1, tokens_done=1, worker="w1") is True
    assert index.get_job(job_id).state is JobState.CANCELLING
    assert sh.finish_shard(index, job_id, 0, "cancelled", worker="w1") is True
    assert index.get_job(job_id).state is JobState.CANCELLING  # its finalize ends it
    assert [s.state for s in sh.list_shards(index, job_id)] == ["cancelled", "cancelled"]
    final = sh.claim_finalize(index, job_id, "f", lease_timeout_s=60)
    assert final is not None and final.cancel_requested
    assert sh.claim_shard(index, job_id, 1, "w2", lease_timeout_s=60) is None


def test_expired_shard_leases_are_requeued_then_failed_past_the_attempt_cap(index: Index) -> None:
    job_id = _sharded(index, max_attempts=2)
    for attempt in (1, 2):
        assert sh.claim_shard(index, job_id, 1, f"w{attempt}", lease_timeout_s=60) is not None
        later = utcnow() + timedelta(seconds=61)
        [expired] = sh.expired_shards(index, beat_before=later)
        sh.shard_heartbeat(index, job_id, 1, f"w{attempt}")  # a late beat: the row moved, no change
        assert sh.expire_shard(index, expired, later) is None
        [expired] = sh.expired_shards(index, beat_before=utcnow() + timedelta(seconds=61))
        outcome = sh.expire_shard(index, expired, later)
        assert outcome == ("queued" if attempt == 1 else "failed")
        with pytest.raises(LeaseLost):  # the dead attempt's writes are refused
            sh.record_shard_chunks(index, job_id, 1, [_chunk("batches/000004/tokens")], worker=f"w{attempt}")
    job = index.get_job(job_id)  # stopping: shard 0 was queued, so it is cancelled; finalize due
    assert job.state is JobState.RUNNING and job.error is not None and sh.finalize_due(index, job_id)
    assert job.error["type"] == "lease-expired" and job.error["shard"] == 1 and job.error["attempts"] == 2
    assert [s.state for s in sh.list_shards(index, job_id)] == ["cancelled", "failed"]
