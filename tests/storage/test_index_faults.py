"""Database faults at the index (docs/reliability.md, "Database faults"): a transaction that meets a
transient error runs again whole within the retry budget, then IndexUnavailable; a connection
opened while the SQLite file was read-only is discarded; a write whose COMMIT landed but whose
acknowledgement was lost is not applied twice. Real SQLite files and a real PostgreSQL server.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from storage.bundle.records import ChunkRecord
from storage.errors import IndexUnavailable
from storage.index import Index, JobState
from storage.index import reconcile as sql
from storage.index.apikeys import ApiKeys
from storage.index.models import JobRow, utcnow
from storage.index.retry import IndexRetry, is_transient
from storage.index.submit import submit_job
from tests.db_faults import lost_commit_acknowledgements, read_only_file, read_only_unavailable, write_lock

SPEC: dict[str, Any] = {"model": {"id": "tiny"}, "prompts": ["hi"]}


def _store_url(job_id: str) -> str:
    return f"/tmp/qk-store/{job_id}"


def _skip_unless_read_only_possible(tmp_path: Path) -> None:
    if reason := read_only_unavailable(tmp_path):
        pytest.skip(f"cannot make the database file read-only here: {reason}")


def _sqlite_index(tmp_path: Path, **retry: float) -> tuple[Index, Path]:
    db = tmp_path / "index.db"
    index = Index(f"sqlite:///{db}", retry=IndexRetry(**retry))
    index.migrate()
    return index, db


def test_which_errors_are_transient(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (a INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    errors: dict[str, BaseException] = {}
    with write_lock(tmp_path / "t.db"), engine.connect() as conn:
        with pytest.raises(OperationalError) as locked:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        errors["locked"] = locked.value
    with engine.connect() as conn:
        for name, statement in (("syntax", "SELEC 1"), ("no table", "SELECT * FROM nope")):
            with pytest.raises(OperationalError) as caught:
                conn.exec_driver_sql(statement)
            errors[name] = caught.value
        with pytest.raises(IntegrityError) as duplicate:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        errors["duplicate"] = duplicate.value
        # the index's disk is full (SQLITE_FULL): pages capped at what the file has now
        (pages,) = conn.exec_driver_sql("PRAGMA page_count").one()
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(OperationalError) as full:
            conn.exec_driver_sql("CREATE TABLE big AS SELECT zeroblob(1000000) AS b")
        errors["disk full"] = full.value
    engine.dispose()
    assert "database is locked" in str(errors["locked"])
    assert {name: is_transient(exc) for name, exc in errors.items()} == {
        "locked": True,
        "syntax": False,
        "no table": False,
        "duplicate": False,
        "disk full": True,
    }
    assert "database or disk is full" in str(errors["disk full"])
    assert not is_transient(ValueError("database is locked"))  # only database errors


def test_lock_held_past_the_budget_is_index_unavailable_and_within_it_waited_out(tmp_path: Path) -> None:
    index, db = _sqlite_index(tmp_path, budget_s=1.0, sqlite_busy_s=0.2)
    job = index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=3)
    with write_lock(db):  # held past the budget: IndexUnavailable after about 1 s, not 10 s
        start = time.monotonic()
        with pytest.raises(IndexUnavailable) as caught:
            index.request_cancel(job.id)
        waited = time.monotonic() - start
    assert 1.0 <= waited < 2.0, waited
    assert caught.value.retry_after_s == 1 and caught.value.status == 503
    assert "QKVAULT_DB_RETRY_S" in caught.value.message and "database is locked" in caught.value.message
    assert index.get_job(job.id).state is JobState.QUEUED  # nothing half-done
    index.retry = IndexRetry(budget_s=5.0, sqlite_busy_s=0.2)
    with write_lock(db, hold_s=1.0):  # released within the budget: the retried write lands
        assert index.request_cancel(job.id).state is JobState.CANCELLED
    assert index.retry_stats.retried == 2 and index.retry_stats.unavailable == 1
    index.dispose()


def test_a_connection_opened_while_the_file_was_read_only_is_discarded(tmp_path: Path) -> None:
    _skip_unless_read_only_possible(tmp_path)
    index, db = _sqlite_index(tmp_path, budget_s=10.0)
    job = index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=3)
    index.dispose()
    with read_only_file(db):
        assert index.get_job(job.id).state is JobState.QUEUED  # reads work: the pool keeps this connection
    pool = index.engine.pool
    assert isinstance(pool, QueuePool) and pool.checkedin() == 1
    # the file is writable again; the pooled connection is still read-only (SQLite never reopens
    # it): the write fails once on it, the pool's connections are discarded, the retry lands
    assert index.request_cancel(job.id).state is JobState.CANCELLED
    stats = index.retry_stats
    assert (stats.retried, stats.failed_tries, stats.discarded) == (1, 1, 1), stats
    for _ in range(3):  # and every later write goes straight through
        index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=3)
    assert index.retry_stats.failed_tries == 1
    index.dispose()


def test_a_write_during_a_read_only_fault_lands_after_it(tmp_path: Path) -> None:
    _skip_unless_read_only_possible(tmp_path)
    index, db = _sqlite_index(tmp_path, budget_s=10.0)
    job = index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=3)
    index.dispose()  # every connection of the write below is opened during the fault
    with read_only_file(db):
        lifted = threading.Timer(1.0, lambda: subprocess.run(["chattr", "-i", str(db)], check=True))
        lifted.start()
        start = time.monotonic()
        assert index.request_cancel(job.id).state is JobState.CANCELLED
        waited = time.monotonic() - start
        lifted.join()
    assert 0.9 <= waited < 4.0, waited
    assert index.retry_stats.retried == 1 and index.retry_stats.failed_tries >= 2
    index.dispose()


def test_a_lost_commit_acknowledgement_applies_each_write_once(index: Index) -> None:
    with lost_commit_acknowledgements():
        job = index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=2)
    with lost_commit_acknowledgements():
        claimed = index.claim(job.id, "w1")
    assert claimed is not None and claimed.attempts == 1 and index.get_job(job.id).attempts == 1
    chunk = ChunkRecord(
        array="attention", coords=(0, 0), key="attention/c/0/0", nbytes=8, checksum="crc32c:0"
    )
    with lost_commit_acknowledgements():
        index.record_chunks(job.id, [chunk], worker="w1")
    assert len(index.list_chunks(job.id)) == 1 and index.get_job(job.id).chunks_written == 1
    with lost_commit_acknowledgements():
        assert index.release(job.id, "w1") is JobState.QUEUED  # not LeaseLost: its own release
    with lost_commit_acknowledgements():
        again = index.claim(job.id, "w2")
    assert again is not None and again.attempts == 2  # one attempt each, never twice
    with lost_commit_acknowledgements():
        done = index.finish(job.id, JobState.SUCCEEDED, result={"ok": True}, worker="w2")
    assert done.state is JobState.SUCCEEDED and done.result == {"ok": True}
    other = index.create_job(spec=SPEC, owner="alice", store_url_for=_store_url, max_attempts=2)
    with lost_commit_acknowledgements():
        assert index.request_cancel(other.id).state is JobState.CANCELLED  # not "already cancelled"
    jobs, _ = index.list_jobs(owner="alice")
    assert sorted(j.id for j in jobs) == sorted([job.id, other.id])
    assert index.retry_stats.retried == 7 and index.retry_stats.unavailable == 0


def test_a_lost_commit_acknowledgement_of_a_submission_or_a_key(index: Index) -> None:
    with lost_commit_acknowledgements():
        first = submit_job(index, spec=SPEC, owner="bob", store_url_for=_store_url, max_attempts=3)
    with lost_commit_acknowledgements():
        keyed = submit_job(
            index, spec=SPEC, owner="bob", store_url_for=_store_url, max_attempts=3, idempotency_key="k1"
        )
    assert first.created and keyed.created  # the API enqueues both (a replay would not be sent)
    replay = submit_job(
        index, spec=SPEC, owner="bob", store_url_for=_store_url, max_attempts=3, idempotency_key="k1"
    )
    assert not replay.created and replay.job.id == keyed.job.id
    jobs, _ = index.list_jobs(owner="bob")
    assert sorted(j.id for j in jobs) == sorted([first.job.id, keyed.job.id])
    keys = ApiKeys(index)
    with lost_commit_acknowledgements():
        secret, record = keys.create(owner="bob")
    assert [k.id for k in keys.list(owner="bob")] == [record.id]
    assert keys.authenticate(secret) == record


def test_a_lost_commit_acknowledgement_of_a_reconciler_transition(index: Index) -> None:
    job = index.create_job(spec=SPEC, owner="carol", store_url_for=_store_url, max_attempts=3)
    index.claim(job.id, "dead-worker")
    seen = index.get_job(job.id)
    with lost_commit_acknowledgements():
        assert sql.requeue_expired(index, seen, utcnow())  # True: the reconciler sends the message
    after = index.get_job(job.id)
    assert after.state is JobState.QUEUED and after.lease_worker is None and after.attempts == 1


def test_a_postgres_connection_killed_mid_transaction_is_retried(index: Index) -> None:
    if index.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    job = index.create_job(spec=SPEC, owner="dave", store_url_for=_store_url, max_attempts=3)
    killer = sa.create_engine(index.engine.url, poolclass=sa.pool.NullPool)
    killed: list[int] = []

    def work(session: Session) -> str:
        pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
        if not killed:  # the server ends this session mid-transaction (57P01, as on a restart)
            with killer.begin() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killed.append(int(pid or 0))
        row = session.get(JobRow, job.id)
        return row.state if row is not None else ""

    assert index.transact(work) == JobState.QUEUED.value
    killer.dispose()
    assert index.retry_stats.retried == 1 and index.retry_stats.discarded == 1
