"""GET /v1/jobs/{id}/bundle: a zip of the job's Zarr store, opened back with xarray."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from fastapi.testclient import TestClient

from storage.index import Index, JobState
from tests.api.support import write_small_bundle

Submit = Callable[..., dict[str, Any]]


def _finish_with_bundle(
    index: Index, job_id: str, state: JobState, *, partial: bool = False
) -> dict[str, Any]:
    job = index.claim(job_id, "worker-1")
    assert job is not None
    data = write_small_bundle(job.store_url)
    error = None if state == JobState.SUCCEEDED else {"type": "test", "title": "T", "detail": "d"}
    index.finish(job_id, state, partial=partial, error=error)
    return data


def _download(client: TestClient, job_id: str, dest: Path) -> tuple[Any, Path]:
    with client.stream("GET", f"/v1/jobs/{job_id}/bundle") as response:
        if response.status_code == 200:
            with dest.open("wb") as fh:
                for piece in response.iter_bytes():
                    fh.write(piece)
        else:
            response.read()
    return response, dest


def test_bundle_of_queued_job_is_409(client: TestClient, submit: Submit) -> None:
    job_id = submit()["id"]
    response = client.get(f"/v1/jobs/{job_id}/bundle")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "bundle-not-ready"
    assert body["detail"] == f"bundle not ready: job is queued; poll GET /v1/jobs/{job_id} until succeeded"


def test_bundle_of_running_job_is_409(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")
    assert "job is running" in client.get(f"/v1/jobs/{job_id}/bundle").json()["detail"]


def test_bundle_zip_of_succeeded_job_opens_with_xarray(
    client: TestClient, submit: Submit, index: Index, tmp_path: Path
) -> None:
    job_id = submit()["id"]
    data = _finish_with_bundle(index, job_id, JobState.SUCCEEDED)

    response, path = _download(client, job_id, tmp_path / "bundle.zip")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}.zarr.zip"'
    assert "x-qkvault-partial" not in response.headers
    with zipfile.ZipFile(path) as zf:
        assert "zarr.json" in zf.namelist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert zf.testzip() is None
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        ds = xr.open_zarr(store, zarr_format=3, consolidated=False)
        assert ds["attention"].dims == ("layer", "batch", "head", "query", "key")
        np.testing.assert_array_equal(ds["attention"].values, data["attention"])
        np.testing.assert_array_equal(ds["tokens"].values, data["tokens"])
        assert ds["attention"].dtype == np.float16
        assert ds.attrs["job_id"] == f"{job_id}.zarr"
    finally:
        store.close()


def test_bundle_download_is_byte_identical_twice(
    client: TestClient, submit: Submit, index: Index, tmp_path: Path
) -> None:
    job_id = submit()["id"]
    _finish_with_bundle(index, job_id, JobState.SUCCEEDED)
    first = client.get(f"/v1/jobs/{job_id}/bundle").content
    second = client.get(f"/v1/jobs/{job_id}/bundle").content
    assert first == second and len(first) > 0


def test_bundle_download_declares_its_exact_length(
    client: TestClient, submit: Submit, index: Index, tmp_path: Path
) -> None:
    """``Content-Length`` is computed before the first byte (clients show a percentage and detect a
    truncated download); it equals the streamed body, which is sent without chunked encoding."""
    job_id = submit()["id"]
    _finish_with_bundle(index, job_id, JobState.SUCCEEDED)

    response, path = _download(client, job_id, tmp_path / "bundle.zip")

    assert response.status_code == 200
    assert "content-length" in response.headers, dict(response.headers)
    assert int(response.headers["content-length"]) == path.stat().st_size > 0
    assert "transfer-encoding" not in response.headers


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.CANCELLED])
def test_partial_bundle_of_ended_job_is_served_and_flagged(
    client: TestClient, submit: Submit, index: Index, tmp_path: Path, state: JobState
) -> None:
    job_id = submit()["id"]
    data = _finish_with_bundle(index, job_id, state, partial=True)

    response, path = _download(client, job_id, tmp_path / "partial.zip")

    assert response.status_code == 200
    assert response.headers["x-qkvault-partial"] == "true"
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        ds = xr.open_zarr(store, zarr_format=3, consolidated=False)
        np.testing.assert_array_equal(ds["tokens"].values, data["tokens"])
    finally:
        store.close()


def test_ended_job_without_partial_data_is_409(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")
    index.finish(job_id, JobState.FAILED, error={"type": "model-load-failed", "title": "T", "detail": "d"})

    response = client.get(f"/v1/jobs/{job_id}/bundle")

    assert response.status_code == 409
    assert "failed and left no partial data" in response.json()["detail"]


def test_succeeded_job_with_empty_store_is_409_not_500(
    client: TestClient, submit: Submit, index: Index
) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")
    index.finish(job_id, JobState.SUCCEEDED)

    response = client.get(f"/v1/jobs/{job_id}/bundle")

    assert response.status_code == 409
    assert response.json()["type"] == "bundle-not-ready"
    assert "zarr.json is missing" in response.json()["detail"]
