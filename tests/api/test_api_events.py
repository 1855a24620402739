"""``GET /v1/jobs/{id}/events`` under uvicorn, on a real SQLite or PostgreSQL index: the stream
sends the job at once, each change a worker writes through the index within the poll interval (and
nothing while nothing changes), ``event: end`` at a terminal state; keep-alives and the time limit;
401 without a key and the same 404 for another owner's job as for a missing one; a client that goes
away frees the server's side; an index that stays unavailable ends the stream with a retry hint,
not a 500."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index, JobState
from storage.index.apikeys import ApiKeys
from tests.api.sse_support import open_events, serve, store_job

POLL_S = 0.1
SLACK_S = 1.0  # scheduling on a busy 2-core machine, on top of one poll interval
WORKER = "worker-1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, api_settings: ApiSettings) -> Iterator[tuple[ApiSettings, Index]]:
    """Settings with a fast poll on SQLite (the test's file) or PostgreSQL (the session's schema),
    and the index they point at."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    settings = api_settings.model_copy(update={"database_url": url, "events_poll_s": POLL_S})
    index = Index(url)
    index.migrate()
    yield settings, index
    index.dispose()


def key_of(index: Index, owner: str, *, admin: bool = False) -> dict[str, str]:
    secret, _ = ApiKeys(index).create(owner=owner, admin=admin, label="test")
    return {"Authorization": f"Bearer {secret}"}


def test_the_stream_follows_the_job_row_until_it_ends(backend: tuple[ApiSettings, Index]) -> None:
    settings, index = backend
    owner = f"ev-{uuid.uuid4().hex[:8]}"
    headers = key_of(index, owner)
    job = store_job(index, owner, settings.store_url)
    with serve(create_app(settings)) as base_url, open_events(base_url, job.id, headers) as stream:
        assert stream.response.status_code == 200
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-cache"
        _, first = stream.next()
        assert stream.lines[0] == "retry: 1000" and stream.parser.retry_ms == 1000
        document = httpx.get(f"{base_url}/v1/jobs/{job.id}", headers=headers).json()
        assert (first.event, json.loads(first.data)) == ("job", document)  # GET's document, at once

        def change(write: Callable[[], object], **expected: Any) -> dict[str, Any]:
            time.sleep(3 * POLL_S)  # several polls of an unchanged row first: nothing is sent
            assert stream.pending() == 0, stream.lines
            write()
            written = time.monotonic()
            arrived, message = stream.next()
            doc: dict[str, Any] = json.loads(message.data)
            assert message.event == "job" and {k: doc[k] for k in expected} == expected, doc
            assert arrived - written < POLL_S + SLACK_S, arrived - written
            return doc

        change(lambda: index.claim(job.id, WORKER), state="running")
        doc = change(
            lambda: index.update_progress(
                job.id, units_done=3, units_total=10, phase="prefill", worker=WORKER
            ),
            phase="prefill",
        )
        assert doc["progress"]["units_done"] == 3 and doc["progress"]["fraction"] == pytest.approx(0.3)
        last = change(lambda: index.finish(job.id, JobState.SUCCEEDED, worker=WORKER), state="succeeded")
        _, end = stream.next()
        assert (end.event, json.loads(end.data)) == ("end", last)
        assert stream.closed.wait(5), "the stream stayed open after `end`"
        assert stream.pending() == 0 and stream.lines[-1] == ""


def test_a_finished_job_gets_its_state_and_end_at_once(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> None:
    job = store_job(index, "local", api_settings.store_url)
    index.request_cancel(job.id)  # a queued job: cancelled at once
    with serve(create_app(api_settings)) as base_url, open_events(base_url, job.id, auth_headers) as stream:
        (_, first), (_, end) = stream.next(), stream.next()
        assert (first.event, end.event) == ("job", "end") and first.data == end.data
        assert json.loads(end.data)["state"] == "cancelled"
        assert stream.closed.wait(5)


def test_auth_and_owner_isolation(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> None:
    job = store_job(index, "local", api_settings.store_url)
    with serve(create_app(api_settings)) as base_url:

        def get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
            return httpx.get(f"{base_url}{path}", headers=headers or {}, timeout=10)

        anonymous = get(f"/v1/jobs/{job.id}/events")
        assert anonymous.status_code == 401 and anonymous.json()["type"] == "unauthenticated"
        assert anonymous.headers["content-type"] == "application/problem+json"

        foreign = get(f"/v1/jobs/{job.id}/events", key_of(index, "bob"))
        missing = get("/v1/jobs/no-such-job/events", auth_headers)
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["type"] == missing.json()["type"] == "job-not-found"
        assert foreign.json()["detail"] == missing.json()["detail"].replace("no-such-job", job.id)

        index.request_cancel(job.id)
        with open_events(base_url, job.id, key_of(index, "root", admin=True)) as stream:
            assert stream.next()[1].event == "job"  # an admin key sees every owner's job


def test_keep_alive_comments_and_the_time_limit(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> None:
    settings = api_settings.model_copy(
        update={"events_poll_s": 0.05, "events_keepalive_s": 0.2, "events_max_stream_s": 1.0}
    )
    job = store_job(index, "local", settings.store_url)
    with serve(create_app(settings)) as base_url, open_events(base_url, job.id, auth_headers) as stream:
        start = time.monotonic()
        assert stream.next()[1].event == "job"
        assert stream.closed.wait(5), "the stream outlived QKVAULT_EVENTS_MAX_STREAM_S"
        open_s = time.monotonic() - start
    assert 0.9 <= open_s < 1.0 + SLACK_S, open_s
    keepalives = [line for line in stream.lines if line == ": keep-alive"]
    assert 2 <= len(keepalives) <= 5, stream.lines  # one per 0.2 s of silence in 1 s (polls may run late)
    assert "QKVAULT_EVENTS_MAX_STREAM_S" in stream.lines[-2] and stream.lines[-2].startswith(":")
    assert stream.pending() == 0  # no `end`: the job is still queued, the client reconnects


def test_a_client_that_leaves_frees_the_server_side(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qkvault.api.events")
    settings = api_settings.model_copy(update={"events_poll_s": 0.05})
    job = store_job(index, "local", settings.store_url)
    app = create_app(settings)
    engine = app.state.services.index.engine
    checkouts: list[float] = []  # one per transaction of the app's index
    sa.event.listen(engine, "checkout", lambda *_: checkouts.append(time.monotonic()))

    def closed_streams() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "qkvault.api.events" and job.id in r.getMessage()
        ]

    with serve(app) as base_url:
        with open_events(base_url, job.id, auth_headers) as stream:
            assert stream.next()[1].event == "job"
            polled = len(checkouts)
            time.sleep(0.3)
            assert len(checkouts) > polled and closed_streams() == []  # following the job
        deadline = time.monotonic() + 5
        while not closed_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(closed_streams()) == 1 and "closed after" in closed_streams()[0], caplog.text
        polled = len(checkouts)
        time.sleep(0.3)  # six poll intervals
        assert len(checkouts) == polled  # the poll loop stopped with the stream
        assert engine.pool.checkedout() == 0  # and left no session open


@pytest.fixture
def limited_role(postgres_url: str) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A PostgreSQL role of this test's own with rights on the session's index: (the index URL
    as that role, ``outage(on)``). ``outage(True)`` ends the role's sessions and refuses it new
    ones (``CONNECTION LIMIT 0``: SQLSTATE 53300, as a server at ``max_connections`` answers);
    ``outage(False)`` lets it in again. Nothing else using the server notices."""
    migrated = Index(postgres_url)
    migrated.migrate()  # the tables exist before the grants
    migrated.dispose()
    admin = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    role = f"qk_events_{uuid.uuid4().hex[:10]}"
    schema = str(sa.engine.make_url(postgres_url).query["options"]).split("=", 1)[1]
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))
        conn.execute(
            sa.text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
        )

    def outage(on: bool) -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"ALTER ROLE {role} CONNECTION LIMIT {0 if on else -1}"))
            if on:
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                    {"r": role},
                )

    try:
        yield (
            sa.engine.make_url(postgres_url).set(username=role).render_as_string(hide_password=False),
            outage,
        )
    finally:
        outage(True)  # its sessions end before the role goes
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_an_index_outage_ends_the_stream_with_a_retry_hint(
    api_settings: ApiSettings, postgres_url: str, limited_role: tuple[str, Callable[[bool], None]]
) -> None:
    role_url, outage = limited_role
    index = Index(postgres_url)
    headers = key_of(index, f"ev-{uuid.uuid4().hex[:8]}")
    owner = ApiKeys(index).authenticate(headers["Authorization"].removeprefix("Bearer "))
    assert owner is not None
    job = store_job(index, owner.owner, api_settings.store_url)
    settings = api_settings.model_copy(
        update={"database_url": role_url, "events_poll_s": 0.05, "db_retry_s": 0.5}
    )
    try:
        with serve(create_app(settings)) as base_url:
            with open_events(base_url, job.id, headers) as stream:
                assert stream.next()[1].event == "job"
                outage(True)
                _, error = stream.next()
                assert stream.closed.wait(5), "the stream stayed open without its index"
            problem = json.loads(error.data)
            assert error.event == "error" and problem["type"] == "index-unavailable", problem
            assert problem["status"] == 503 and problem["retry_after_s"] == 1
            assert stream.parser.retry_ms == 1000  # the Retry-After, as the SSE reconnection delay
            assert "QKVAULT_DB_RETRY_S" in problem["detail"]

            assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200  # the server lives on
            refused = httpx.get(f"{base_url}/v1/jobs/{job.id}/events", headers=headers, timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"  # not a 500

            outage(False)
            index.claim(job.id, WORKER)
            with open_events(base_url, job.id, headers) as again:  # the client reconnects
                assert json.loads(again.next()[1].data)["state"] == "running"
    finally:
        index.dispose()
