"""API keys and idempotent, limited job submission in the SQL index (SQLite WAL and PostgreSQL).

Keys: only a sha256 reaches the database (checked on the rows and on the raw SQLite file bytes);
revocation takes effect at once. Submission: one job per (owner, Idempotency-Key) even under
concurrent submits; the jobs-in-flight cap holds under concurrency too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.index import Index, JobState
from storage.index.apikeys import ApiKeyNotFound, ApiKeys, hash_key
from storage.index.submit import IdempotencyKeyReused, Submitted, TooManyJobsInFlight, submit_job

SPEC: dict[str, Any] = {"model": {"id": "tiny"}, "prompts": ["hi"], "generation": {"max_new_tokens": 2}}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index(request: pytest.FixtureRequest) -> Iterator[Index]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    idx = Index(url)
    idx.migrate()
    yield idx
    idx.dispose()


def _owner(name: str) -> str:
    """Owners unique to one test: the PostgreSQL schema is shared by the whole session."""
    return f"{name}-{threading.get_ident()}-{id(object())}"


def _submit(index: Index, owner: str, **kw: Any) -> Submitted:
    args: dict[str, Any] = {"spec": SPEC, "max_attempts": 3, "store_url_for": lambda j: f"/s/{j}.zarr"}
    args.update(kw)
    return submit_job(index, owner=owner, **args)


def _concurrently(n: int, fn: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        try:
            out = fn(i)
            with lock:
                results.append(out)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# -- API keys -------------------------------------------------------------------------------------


def test_key_is_stored_only_as_its_sha256(index: Index, sqlite_url: str) -> None:
    keys = ApiKeys(index)
    secret, record = keys.create(owner="alice", label="laptop")

    assert secret.startswith("qk_") and len(secret) == 46
    with index.engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(sa.text("SELECT * FROM api_keys WHERE id = :i"), {"i": record.id})
        ]
    assert len(rows) == 1
    row = rows[0]
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest() == hash_key(secret)
    assert all(secret not in str(value) for value in row.values()), "the plaintext secret is in the table"
    assert row["prefix"] == secret[:12]  # a short, harmless prefix to recognise the key
    if index.database_url == sqlite_url:  # and not anywhere in the database files (WAL included)
        index.dispose()
        db = Path(sqlite_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert hash_key(secret).encode() in raw  # sanity: we are reading the right bytes
        assert secret.encode() not in raw and secret[12:].encode() not in raw


def test_authenticate_list_and_revoke(index: Index) -> None:
    keys = ApiKeys(index)
    owner = _owner("bob")
    secret, record = keys.create(owner=owner)
    admin_secret, admin = keys.create(owner=owner, admin=True)

    assert keys.authenticate(secret) == record
    assert keys.authenticate(admin_secret) == admin and admin.admin and admin.role == "admin"
    for wrong in (
        "",
        "qk_",
        secret[:-1],
        secret + "x",
        "Bearer " + secret,
        "qk_" + "a" * 500,
        secret.upper(),
    ):
        assert keys.authenticate(wrong) is None, wrong
    assert [k.id for k in keys.list(owner=owner)] == [record.id, admin.id]

    revoked = keys.revoke(record.id)
    assert revoked.revoked and keys.authenticate(secret) is None
    assert keys.revoke(record.id).revoked_at == revoked.revoked_at  # twice: a no-op
    assert [k.id for k in keys.list(owner=owner)] == [admin.id]
    assert [k.id for k in keys.list(owner=owner, include_revoked=True)] == [record.id, admin.id]
    assert keys.authenticate(admin_secret) == admin  # the owner's other key keeps working
    with pytest.raises(ApiKeyNotFound, match="qkvault keys list"):
        keys.revoke("no-such-key")


@pytest.mark.parametrize("owner", ["", " alice", "a/b", "x" * 256, "al ice"])
def test_invalid_owner_is_refused(index: Index, owner: str) -> None:
    with pytest.raises(ValueError, match="invalid owner"):
        ApiKeys(index).create(owner=owner)


def test_key_file_is_reused_while_valid(index: Index, tmp_path: Path) -> None:
    keys = ApiKeys(index)
    path = tmp_path / "home" / "api-key"
    first, created = keys.ensure_key_file(path, owner="local")
    assert created and path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.ensure_key_file(path, owner="local") == (first, False)
    keys.revoke(keys.authenticate(first).id)  # type: ignore[union-attr]
    second, created = keys.ensure_key_file(path, owner="local")
    assert created and second != first and keys.authenticate(second) is not None


# -- submission -----------------------------------------------------------------------------------


def test_same_key_same_spec_returns_the_first_job(index: Index) -> None:
    owner = _owner("carol")
    first = _submit(index, owner, idempotency_key="k1")
    again = _submit(index, owner, idempotency_key="k1", spec=dict(reversed(list(SPEC.items()))))
    assert first.created and not again.created and again.job.id == first.job.id

    with pytest.raises(IdempotencyKeyReused, match=r"different job spec.*new Idempotency-Key") as info:
        _submit(index, owner, idempotency_key="k1", spec={**SPEC, "prompts": ["other"]})
    assert info.value.detail["job_id"] == first.job.id

    other_owner = _submit(index, _owner("dave"), idempotency_key="k1")  # keys are scoped per owner
    no_key = [_submit(index, owner) for _ in range(2)]
    assert other_owner.created and other_owner.job.id != first.job.id
    assert all(s.created for s in no_key) and no_key[0].job.id != no_key[1].job.id


def test_concurrent_duplicates_create_exactly_one_job(index: Index) -> None:
    owner = _owner("erin")
    results, errors = _concurrently(12, lambda _i: _submit(index, owner, idempotency_key="same"))

    assert errors == []
    assert sum(r.created for r in results) == 1
    assert len({r.job.id for r in results}) == 1
    jobs, _ = index.list_jobs(owner=owner)
    assert len(jobs) == 1


def test_jobs_in_flight_cap(index: Index) -> None:
    owner = _owner("frank")
    jobs = [_submit(index, owner, max_in_flight=2, idempotency_key=f"k{i}").job for i in range(2)]
    with pytest.raises(TooManyJobsInFlight, match="QKVAULT_MAX_JOBS_IN_FLIGHT=2") as info:
        _submit(index, owner, max_in_flight=2)
    assert info.value.status == 429 and info.value.detail == {"limit": 2, "in_flight": 2}
    assert not _submit(index, owner, max_in_flight=2, idempotency_key="k0").created  # a replay passes
    assert _submit(index, _owner("gina"), max_in_flight=2).created  # per owner

    index.claim(jobs[0].id, "w1")  # running and cancelling still count
    index.request_cancel(jobs[0].id)
    with pytest.raises(TooManyJobsInFlight):
        _submit(index, owner, max_in_flight=2)
    index.request_cancel(jobs[1].id)  # queued -> cancelled: a slot frees up
    assert index.get_job(jobs[1].id).state is JobState.CANCELLED
    assert _submit(index, owner, max_in_flight=2).created


def test_jobs_in_flight_cap_holds_under_concurrency(index: Index) -> None:
    owner = _owner("hank")
    results, errors = _concurrently(10, lambda i: _submit(index, owner, max_in_flight=3))
    assert len(results) == 3 and all(r.created for r in results)
    assert len(errors) == 7 and all(isinstance(e, TooManyJobsInFlight) for e in errors), errors
