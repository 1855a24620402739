"""A running qkvault stack for end-to-end tests: real Redis, a real Celery worker process, the API
under uvicorn, SQLite or PostgreSQL, and a local or S3 (moto server) bundle store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkvault.client import Client
from storage.index import Index
from storage.index.apikeys import ApiKeys
from tests.services import S3Server, qkvault_env, start_api, start_worker
from tests.worker.conftest import model_cache_dir
from tests.worker.tiny_models import build_tiny_model


@dataclass
class Stack:
    name: str
    client: Client
    base_url: str
    env: dict[str, str]
    store_url: str
    storage_options: dict[str, Any]
    logs: Path
    api_key: str  # of owner "e2e", created in the index before the API starts

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("e2e-models") / "llama"))


@pytest.fixture(scope="session")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Allows thousands of positions: a job that runs long enough to be cancelled while running."""
    return str(
        build_tiny_model(
            "llama",
            tmp_path_factory.mktemp("e2e-models") / "long",
            overrides={"max_position_embeddings": 8192},
        )
    )


def _stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str, kind: str
) -> Iterator[Stack]:
    database, store = kind.split("-")
    root = tmp_path_factory.mktemp(f"stack-{kind}")
    s3: S3Server | None = None
    storage_options: dict[str, Any] = {}
    if database == "postgres":
        database_url = request.getfixturevalue("postgres_url")
    else:
        database_url = f"sqlite:///{root}/index.db"
    if store == "s3":
        s3 = request.getfixturevalue("s3_server")
        store_url = s3.new_store_url()
        storage_options = s3.storage_options()
    else:
        store_url = str(root / "store")
    index = Index(database_url)
    index.migrate()
    api_key, _ = ApiKeys(index).create(owner="e2e", label=f"e2e {kind}")
    index.dispose()
    env = qkvault_env(
        redis_url=redis_url,
        database_url=database_url,
        store_url=store_url,
        s3=s3,
        device="cpu",
        model_cache_dir=str(model_cache_dir()),
        model_roots=[tmp_path_factory.getbasetemp()],  # the tiny models' folders (tmp_path_factory)
        queue_name=f"qk-e2e-{uuid.uuid4().hex[:8]}",
        progress_interval_s=0.1,
    )
    logs = root / "logs"
    with (
        start_worker(env, logs / "worker.log"),
        start_api(env, log_path=logs / "api.log") as api,
        Client(api.base_url, timeout_s=30.0, api_key=api_key) as client,
    ):
        yield Stack(kind, client, api.base_url, env, store_url, storage_options, logs, api_key)


@pytest.fixture(
    scope="module", params=["sqlite-local", pytest.param("postgres-s3", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Stack]:
    yield from _stack(request, tmp_path_factory, redis_url, request.param)


@pytest.fixture(scope="module")
def local_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Stack]:
    yield from _stack(request, tmp_path_factory, redis_url, "sqlite-local")
