"""storage.index on SQLite (a temporary file) and PostgreSQL (a fresh schema per test)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import storage.index.repo as repo_module
from storage.errors import JobNotFound, JobStateConflict
from storage.index import TERMINAL_STATES, ChunkRecord, Index, JobRecord, JobState
from storage.index.migrate import current_revision
from storage.index.models import Base, JobRow
from storage.jobs.fields import COMPUTED_FIELDS, JobFields
from tests.conftest import IndexFactory

REPO_ROOT = Path(__file__).resolve().parents[2]


def _store_url(job_id: str) -> str:
    return f"file:///tmp/qkvault-store/{job_id}"


def _create(index: Index, owner: str = "alice", **kw: Any) -> JobRecord:
    kw.setdefault("max_attempts", 3)
    return index.create_job(
        spec={"model": "tiny", "prompts": ["hi"]}, owner=owner, store_url_for=_store_url, **kw
    )


def _chunk(array: str, *coords: int, nbytes: int = 100) -> ChunkRecord:
    key = f"{array}/c/" + "/".join(map(str, coords)) if coords else f"{array}/c"
    return ChunkRecord(array=array, coords=coords, key=key, nbytes=nbytes, checksum="sha256:" + "0" * 64)


def _assert_utc(*values: datetime | None) -> None:
    for value in values:
        assert value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)


# -- schema and engine ------------------------------------------------------------------------------


def test_migrate_twice_is_a_noop_and_matches_models(index: Index) -> None:
    job = _create(index)
    index.migrate()
    assert current_revision(index.engine) == "0004"
    assert index.get_job(job.id) == job
    with index.engine.connect() as conn:
        if index.schema is not None:  # PostgreSQL: the tables live in the schema given to Index()
            assert conn.execute(sa.text("SELECT current_schema()")).scalar() == index.schema
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"migrations and models disagree: {diff}"


def test_job_fields_agree_from_row_to_record_to_public_document() -> None:
    """The public job fields are declared once (storage.jobs.fields.JobFields); the record carries
    each of them under the same name, and the row a column for every record field (the mappers copy by
    name; the migrations match the row: test above)."""
    record_fields = {f.name for f in fields(JobRecord)}
    columns = {c.name for c in JobRow.__table__.columns}
    assert columns - record_fields == {"idempotency_key", "request_hash"}  # submission bookkeeping
    assert record_fields <= columns
    public = set(JobFields.model_fields) - COMPUTED_FIELDS
    assert public <= record_fields, public - record_fields
    assert {"lease_worker", "store_url", "units_done", "units_total"} <= record_fields - public  # internal


def test_record_maps_to_public_fields(index: Index) -> None:
    job = index.create_job(
        spec={"prompts": ["a"]}, owner="alice", store_url_for=lambda i: f"/s/{i}", max_attempts=2
    )
    index.claim(job.id, "w1")
    index.update_progress(job.id, units_done=1, units_total=4, phase="prefill")
    record = index.get_job(job.id)

    values = record.public_fields()

    assert set(values) == set(JobFields.model_fields) - {"links"}
    assert values["spec"] == {"prompts": ["a"]} and values["owner"] == "alice" and values["attempts"] == 1
    assert values["progress"].fraction == 0.25 and values["progress"].units_total == 4
    assert JobFields.model_validate({**values, "links": {}}).state == "running"


def test_concurrent_migrate_on_fresh_database(new_index: IndexFactory) -> None:
    indexes = [new_index() for _ in range(3)]
    errors: list[BaseException] = []

    def run(idx: Index) -> None:
        try:
            idx.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(idx,)) for idx in indexes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current_revision(indexes[0].engine) == "0004"


def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = tmp_path / "not" / "yet" / "index.db"
    index = Index(f"sqlite:///{db}")
    assert not db.parent.exists(), "no engine or connection at construction"
    index.migrate()
    with index.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    index.dispose()
    assert _create(index).state is JobState.QUEUED  # usable again after dispose


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported index database"):
        Index("mysql://u@h/db")
    with pytest.raises(ValueError, match="only supported on PostgreSQL"):
        Index("sqlite:///x.db", schema="s")
    with pytest.raises(ValueError, match="invalid schema name"):
        Index("postgresql+psycopg://u@h/db", schema='x"; drop')


def test_alembic_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "QKVAULT_DATABASE_URL": url}
    cmd = [
        sys.executable,
        "-m",
        "alembic",
        "-c",
        str(REPO_ROOT / "storage/index/alembic.ini"),
        "upgrade",
        "head",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    index = Index(url)
    assert current_revision(index.engine) == "0004"
    index.migrate()  # already at head
    index.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_its_own_connections(index: Index) -> None:
    job = _create(index)
    assert index.get_job(job.id) == job  # the parent's pool now holds an idle connection
    pid = os.fork()
    if pid == 0:  # child (like a Celery prefork child): must not reuse the parent's sockets
        code = 1
        try:
            pool = index.engine.pool
            assert isinstance(pool, sa.pool.QueuePool) and pool.checkedin() == 0
            index.update_progress(job.id, units_done=7)
            index.dispose()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert index.get_job(job.id).units_done == 7


# -- jobs ---------------------------------------------------------------------------------------------


def test_create_and_get(index: Index) -> None:
    job = _create(index, label="first")
    assert job.state is JobState.QUEUED and len(job.id) == 36
    assert job.store_url == _store_url(job.id)
    assert (job.owner, job.label, job.attempts, job.max_attempts) == ("alice", "first", 0, 3)
    assert job.spec == {"model": "tiny", "prompts": ["hi"]}
    assert job.error is None and job.result is None and not job.partial and not job.cancel_requested
    _assert_utc(job.created_at, job.updated_at)
    got = index.get_job(job.id, owner="alice")
    assert got == job
    _assert_utc(got.created_at, got.updated_at)

    named = _create(index, job_id="my-job-1")
    assert index.get_job("my-job-1").id == named.id
    with pytest.raises(JobStateConflict, match="already exists"):
        _create(index, job_id="my-job-1")


def test_owner_isolation(index: Index) -> None:
    job = _create(index, owner="alice")
    with pytest.raises(JobNotFound) as wrong_owner:
        index.get_job(job.id, owner="bob")
    with pytest.raises(JobNotFound) as missing:
        index.get_job("no-such-job", owner="bob")
    assert str(wrong_owner.value).replace(job.id, "X") == str(missing.value).replace("no-such-job", "X")
    with pytest.raises(JobNotFound):
        index.request_cancel(job.id, owner="bob")
    assert index.get_job(job.id).owner == "alice"  # owner=None: any job
    assert index.list_jobs(owner="bob") == ([], None)


def _all_pages(index: Index, **kw: Any) -> list[JobRecord]:
    seen: list[JobRecord] = []
    cursor = None
    while True:
        page, cursor = index.list_jobs(cursor=cursor, **kw)
        assert len(page) <= kw["limit"]
        seen.extend(page)
        if cursor is None:
            return seen


def test_list_jobs_pages(index: Index) -> None:
    alice = [_create(index, owner="alice") for _ in range(7)]
    bob = [_create(index, owner="bob") for _ in range(2)]
    first, cursor = index.list_jobs(owner="alice", limit=3)
    assert [j.id for j in first] == [j.id for j in reversed(alice)][:3] and cursor is not None
    pages = _all_pages(index, owner="alice", limit=3)
    assert [j.id for j in pages] == [j.id for j in reversed(alice)]
    assert [j.id for j in _all_pages(index, owner=None, limit=4)] == [j.id for j in reversed(alice + bob)]
    assert index.list_jobs(owner="alice", limit=7)[1] is None
    index.request_cancel(alice[2].id)
    cancelled, _ = index.list_jobs(owner=None, state=JobState.CANCELLED)
    assert [j.id for j in cancelled] == [alice[2].id]
    for bad in ("garbage!", "e30", ""):
        with pytest.raises(ValueError, match="invalid cursor"):
            index.list_jobs(owner="alice", cursor=bad)
    with pytest.raises(ValueError, match="limit"):
        index.list_jobs(owner="alice", limit=0)


def test_list_jobs_pages_with_equal_timestamps(index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    same = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    monkeypatch.setattr(repo_module, "utcnow", lambda: same)
    jobs = [_create(index) for _ in range(5)]
    pages = _all_pages(index, owner="alice", limit=2)
    assert [j.id for j in pages] == sorted((j.id for j in jobs), reverse=True)
    assert all(j.created_at == same for j in pages)


def test_cancel_queued(index: Index) -> None:
    job = index.request_cancel(_create(index).id, owner="alice")
    assert job.state is JobState.CANCELLED and job.cancel_requested and not job.partial
    _assert_utc(job.finished_at)
    assert index.claim(job.id, "w1") is None


def test_cancel_running_then_claim(index: Index) -> None:
    job = _create(index)
    assert index.claim(job.id, "w1") is not None
    cancelling = index.request_cancel(job.id)
    assert cancelling.state is JobState.CANCELLING and cancelling.cancel_requested
    assert cancelling.finished_at is None
    assert index.request_cancel(job.id) == cancelling  # unchanged
    assert index.update_progress(job.id, units_done=1) is True
    assert index.is_cancel_requested(job.id)
    index.record_chunks(job.id, [_chunk("attention", 0, 0)])
    # the worker died (its lease expired); the redelivered task must not run again
    assert index.claim(job.id, "w2", lease_timeout_s=0) is None
    done = index.get_job(job.id)
    assert done.state is JobState.CANCELLED and done.partial and done.lease_worker is None


@pytest.mark.parametrize("final", sorted(TERMINAL_STATES))
def test_cancel_terminal_conflicts(index: Index, final: JobState) -> None:
    job = _create(index)
    index.claim(job.id, "w1")
    index.finish(job.id, final)
    with pytest.raises(JobStateConflict, match=f"already {final.value}"):
        index.request_cancel(job.id)


def test_claim_attempts_and_cap(index: Index) -> None:
    job = _create(index, max_attempts=2)
    first = index.claim(job.id, "w1")
    assert first is not None and first.state is JobState.RUNNING and first.attempts == 1
    assert first.lease_worker == "w1"
    _assert_utc(first.started_at, first.heartbeat_at)
    second = index.claim(job.id, "w2", lease_timeout_s=0)  # redelivered after w1 was lost
    assert second is not None and second.attempts == 2 and second.lease_worker == "w2"
    assert second.started_at == first.started_at
    assert index.claim(job.id, "w3", lease_timeout_s=0) is None
    failed = index.get_job(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error["type"] == "attempts-exhausted" and failed.attempts == 2
    assert failed.lease_worker is None and not failed.partial
    _assert_utc(failed.finished_at)
    assert index.claim(job.id, "w4") is None  # terminal
    with pytest.raises(JobNotFound):
        index.claim("no-such-job", "w1")


def test_concurrent_claims_respect_the_cap(index: Index) -> None:
    job = _create(index, max_attempts=3)
    results: list[JobRecord | None] = []
    barrier = threading.Barrier(6)

    def claim(n: int) -> None:
        barrier.wait()
        results.append(index.claim(job.id, f"w{n}", lease_timeout_s=0))  # every lease taken over

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [r for r in results if r is not None]
    assert sorted(r.attempts for r in claimed) == [1, 2, 3]
    assert index.get_job(job.id).state is JobState.FAILED


def test_heartbeat_and_progress(index: Index) -> None:
    job = _create(index)
    with pytest.raises(JobNotFound):
        index.update_progress("no-such-job", units_done=1)
    with pytest.raises(JobNotFound):
        index.heartbeat("no-such-job", "w1")
    claimed = index.claim(job.id, "w1")
    assert claimed is not None and claimed.heartbeat_at is not None
    index.heartbeat(job.id, "w1")
    beat = index.get_job(job.id).heartbeat_at
    assert beat is not None and beat >= claimed.heartbeat_at
    index.heartbeat(job.id, "someone-else")  # ignored
    assert index.get_job(job.id).heartbeat_at == beat
    assert index.update_progress(job.id, units_total=10, phase="prefill") is False
    assert index.update_progress(job.id, units_done=4) is False
    now = index.get_job(job.id)
    assert (now.units_done, now.units_total, now.phase) == (4, 10, "prefill")
    assert now.updated_at >= claimed.updated_at and now.heartbeat_at is not None
    assert not index.is_cancel_requested(job.id)


def test_record_chunks_is_idempotent(index: Index) -> None:
    job = _create(index)
    index.claim(job.id, "w1")
    first = [_chunk("attention", 0, 0, 0), _chunk("attention", 0, 0, 1, nbytes=50), _chunk("q", 2, 0)]
    index.record_chunks(job.id, first)
    index.record_chunks(job.id, first)  # redelivered job re-records the same chunks
    more = [*first, _chunk("q", 10, 0, nbytes=7), _chunk("tokens", nbytes=3), _chunk("q", 10, 0, nbytes=8)]
    index.record_chunks(job.id, more)
    index.record_chunks(job.id, [])
    chunks = index.list_chunks(job.id)
    assert [(c.array, c.coords) for c in chunks] == [
        ("attention", (0, 0, 0)),
        ("attention", (0, 0, 1)),
        ("q", (2, 0)),
        ("q", (10, 0)),  # numeric order, not "10.0" < "2.0"
        ("tokens", ()),
    ]
    assert chunks[3].nbytes == 8 and chunks[0].key == "attention/c/0/0/0"
    assert index.list_chunks(job.id, array="q") == chunks[2:4]
    got = index.get_job(job.id)
    assert (got.chunks_written, got.bytes_written) == (5, 100 + 50 + 100 + 8 + 3)
    with pytest.raises(JobNotFound):
        index.record_chunks("no-such-job", first)
    with pytest.raises(ValueError, match="non-negative"):
        index.record_chunks(job.id, [_chunk("q", -1)])


def test_finish(index: Index) -> None:
    job = _create(index)
    index.claim(job.id, "w1")
    with pytest.raises(ValueError, match="terminal state"):
        index.finish(job.id, JobState.RUNNING)
    done = index.finish(job.id, JobState.SUCCEEDED, result={"bytes": 123, "arrays": ["attention"]})
    assert done.state is JobState.SUCCEEDED and done.result == {"bytes": 123, "arrays": ["attention"]}
    assert done.lease_worker is None and done.error is None and not done.partial
    _assert_utc(done.finished_at)
    assert index.get_job(job.id) == done
    with pytest.raises(JobStateConflict, match="already ended"):
        index.finish(job.id, JobState.FAILED)

    other = _create(index)
    index.claim(other.id, "w1")
    problem = {"type": "model-load-failed", "title": "ModelLoadError", "detail": "no weights"}
    failed = index.finish(other.id, JobState.FAILED, error=problem, partial=True)
    assert failed.error == problem and failed.partial and failed.result is None
