"""Fixtures for API tests: a real SQLite index and local object store in ``tmp_path``, a real Redis
broker (``redis_url`` from ``tests/conftest.py``) with a queue of the test's own. No worker runs:
tests look at the task messages in Redis and drive job states through the index, as a worker would.

Model folders the tests write live in ``tmp_path``: it is the app's one model root
(``QKVAULT_MODEL_ROOTS``), so an absolute path elsewhere is refused as on a real server.

Authentication is real: ``api_key`` is a key of owner ``local`` created in the test's index (as
``qkvault keys create`` would), and ``client`` sends it on every request; ``make_key`` creates more.
``backend_client`` runs the app on SQLite and on PostgreSQL, for what differs between the two.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index
from storage.index.apikeys import ApiKeys
from storage.stores.objectstore import ObjectStore
from tests.api.support import MAX_NEW_TOKENS, MAX_PROMPTS, SMOLLM2


@pytest.fixture
def queue_name(redis_url: str) -> Iterator[str]:
    """A queue of this test's own, so nothing else consumes or counts its messages."""
    name = f"qkvault-api-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def api_settings(tmp_path: Path, sqlite_url: str, redis_url: str, queue_name: str) -> ApiSettings:
    return ApiSettings(
        database_url=sqlite_url,
        store_url=str(tmp_path / "store"),
        redis_url=redis_url,
        queue_name=queue_name,
        max_prompts=MAX_PROMPTS,
        max_new_tokens=MAX_NEW_TOKENS,
        max_attempts=3,
        migrate_on_startup=False,
        model_roots=[tmp_path],
    )


@pytest.fixture
def index(api_settings: ApiSettings) -> Iterator[Index]:
    idx = Index(api_settings.database_url)
    idx.migrate()
    yield idx
    idx.dispose()


@pytest.fixture
def make_key(index: Index) -> Callable[..., str]:
    """``make_key("alice", admin=False)`` -> the secret of a new API key in the test's index."""

    def make(owner: str = "local", *, admin: bool = False) -> str:
        secret, _ = ApiKeys(index).create(owner=owner, admin=admin, label="test")
        return secret

    return make


@pytest.fixture
def api_key(make_key: Callable[..., str]) -> str:
    return make_key("local")


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def store(api_settings: ApiSettings) -> ObjectStore:
    return ObjectStore.from_settings(api_settings)


@pytest.fixture
def client(api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    app = create_app(api_settings)
    with TestClient(app, raise_server_exceptions=False, headers=auth_headers) as test_client:
        yield test_client


@pytest.fixture
def submit(client: TestClient) -> Callable[..., dict[str, Any]]:
    """POST a minimal valid spec (plus overrides) and return the 202 body."""

    def _submit(**overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]}
        spec.update(overrides)
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    return _submit


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend_client(
    request: pytest.FixtureRequest, api_settings: ApiSettings
) -> Iterator[tuple[TestClient, Index]]:
    """The app on SQLite (the test's file) or PostgreSQL (the session's schema) with a key of a
    fresh owner."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    index = Index(url)
    index.migrate()
    secret, _ = ApiKeys(index).create(owner=f"conc-{uuid.uuid4().hex[:8]}")
    app = create_app(api_settings.model_copy(update={"database_url": url}))
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {secret}"}) as c:
        yield c, index
    index.dispose()
