"""Fixtures for the client tests (bundle builders live in ``client_bundles.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from client_bundles import JOB_ID, write_bundle, zip_bundle


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """``make_bundle(kind="zip"|"dir", attention=True)`` -> path of a fresh test bundle."""

    def make(kind: str = "zip", *, attention: bool = True) -> Path:
        where = tmp_path / f"{kind}-{'att' if attention else 'noatt'}"
        where.mkdir()
        zarr_dir = write_bundle(where, attention=attention)
        return zarr_dir if kind == "dir" else zip_bundle(zarr_dir, where / f"{JOB_ID}.zarr.zip")

    return make
