"""The API while the index database is unavailable (docs/reliability.md, "Database faults"): past
``QKVAULT_DB_RETRY_S`` a request answers 503 ``index-unavailable`` with ``Retry-After`` and a problem
document, never a 500 and never after SQLite's whole busy timeout; a fault that ends within the
budget is not seen by the client. A real SQLite file, another connection holding its write lock.
(A PostgreSQL server stopped under the API: tests/worker/test_postgres_faults.py.)
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index
from tests.api.support import SMOLLM2, queued_messages

PROBLEM_JSON = "application/problem+json"
SPEC: dict[str, Any] = {"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]}
BUDGET_S = 1.5


def _database(settings: ApiSettings) -> Path:
    return Path(settings.database_url.removeprefix("sqlite:///"))


def _unavailable(response: Any) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["type"] == "index-unavailable" and body["status"] == 503
    assert {"title", "detail", "instance"} <= body.keys()
    return body


def test_submit_while_another_connection_holds_the_write_lock(
    api_settings: ApiSettings,
    index: Index,
    auth_headers: dict[str, str],
    broker: redis.Redis,
    queue_name: str,
) -> None:
    settings = api_settings.model_copy(update={"db_retry_s": BUDGET_S})
    lock = sqlite3.connect(_database(settings), isolation_level=None, check_same_thread=False)
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        assert client.post("/v1/jobs", json=SPEC).status_code == 202  # admission warmed up
        lock.execute("BEGIN IMMEDIATE")  # held past the budget (and past nothing else)
        start = time.monotonic()
        refused = client.post("/v1/jobs", json=SPEC)
        waited = time.monotonic() - start
        reads = client.get("/v1/jobs")  # readers are not blocked by SQLite's write lock (WAL)
        lock.rollback()
        body = _unavailable(refused)
        assert refused.headers["retry-after"] == "2"  # the budget, rounded up
        assert "QKVAULT_DB_RETRY_S" in body["detail"] and "database is locked" in body["detail"]
        assert BUDGET_S <= waited < BUDGET_S + 1.5, waited
        assert reads.status_code == 200 and len(reads.json()["items"]) == 1  # nothing stored
        assert len(queued_messages(broker, queue_name)) == 1  # nothing queued

        lock.execute("BEGIN IMMEDIATE")  # released within the budget: the client sees nothing
        threading.Timer(0.7, lock.rollback).start()
        start = time.monotonic()
        accepted = client.post("/v1/jobs", json=SPEC)
        waited = time.monotonic() - start
        assert accepted.status_code == 202, accepted.text
        assert 0.6 <= waited < BUDGET_S + 0.5, waited
    lock.close()
    jobs, _ = index.list_jobs(owner="local")
    assert len(jobs) == 2 and len(queued_messages(broker, queue_name)) == 2
    print(f"write lock held: 503 after {BUDGET_S} s budget; released after 0.7 s: 202 after {waited:.2f} s")


def test_a_transient_database_error_outside_the_retries_is_a_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT ...", None, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(Index, "list_jobs", locked)
    response = client.get("/v1/jobs")
    _unavailable(response)
    assert response.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert client.get("/v1/jobs").status_code == 200  # the connection is still usable


def test_every_route_documents_the_503(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = [(p, m, op) for p, item in paths.items() if p.startswith("/v1") for m, op in item.items()]
    assert operations and all("503" in op["responses"] for _, _, op in operations)
