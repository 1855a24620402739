"""GET /v1/jobs/{id}/tiles/...: the pyramid info and 256 × 256 tiles (npy and PNG) of one attention
matrix through the real app on a local store (S3: tests/api/test_api_arrays.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.encode import VIRIDIS_ANCHORS, colormap_rgba
from bench.synthetic import SyntheticBundle
from storage.index import Index
from tests.api.viewer_support import Submit, finished_job, load_npy

TOKENS = 600  # levels 600, 300, 150; three tiles per side at level 0


@pytest.fixture
def job(submit: Submit, index: Index) -> tuple[str, np.ndarray]:
    spec = SyntheticBundle(lengths=[TOKENS, 100], layers=(4,), heads=(2, 7), chunk_rows=128)
    job_id, written = finished_job(submit, index, spec)
    return job_id, written["attention"]


def test_pyramid_info(client: TestClient, job: tuple[str, np.ndarray]) -> None:
    job_id, _ = job
    response = client.get(f"/v1/jobs/{job_id}/tiles/4/7/0")
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("tokens", "tile", "levels", "level_sizes", "pools", "ready")} == {
        "tokens": TOKENS,
        "tile": 256,
        "levels": 3,
        "level_sizes": [[600, 600], [300, 300], [150, 150]],
        "pools": ["max", "mean"],
        "ready": False,
    }
    assert body["token_strings"][:2] == ["t0.0", "t0.1"] and len(body["token_strings"]) == TOKENS
    short = client.get(f"/v1/jobs/{job_id}/tiles/4/2/1").json()  # 100 tokens: one level, ready at once
    assert (short["tokens"], short["levels"], short["ready"]) == (100, 1, True)


def test_npy_tiles_of_every_level(client: TestClient, job: tuple[str, np.ndarray]) -> None:
    job_id, attention = job
    matrix = attention[0, 0, 1, :TOKENS, :TOKENS].astype(np.float64)
    edge = load_npy(
        client.get(f"/v1/jobs/{job_id}/tiles/4/7/0/0/2/1").content
    )  # rows 512..599, keys 256..511
    assert edge.dtype == np.float32 and edge.shape == (256, 256)
    np.testing.assert_array_equal(edge[:88], matrix[512:600, 256:512].astype(np.float32))
    assert np.isnan(edge[88:]).all()
    coarse = client.get(f"/v1/jobs/{job_id}/tiles/4/7/0/2/0/0", params={"pool": "max"})
    assert coarse.status_code == 200 and coarse.headers["content-type"] == "application/x-npy"
    top = load_npy(coarse.content)
    expected_max = matrix.reshape(150, 4, 150, 4).max(axis=(1, 3))
    np.testing.assert_allclose(top[:150, :150], expected_max, rtol=1e-6)
    assert np.isnan(top[150:]).all() and np.isnan(top[:, 150:]).all()
    mean = load_npy(client.get(f"/v1/jobs/{job_id}/tiles/4/7/0/1/1/0", params={"pool": "mean"}).content)
    expected_mean = matrix.reshape(300, 2, 300, 2).mean(axis=(1, 3))[256:300, 0:256]
    np.testing.assert_allclose(mean[:44], expected_mean, rtol=1e-5, atol=1e-9)
    assert client.get(f"/v1/jobs/{job_id}/tiles/4/7/0").json()["ready"]


def test_png_tile(client: TestClient, job: tuple[str, np.ndarray]) -> None:
    job_id, _ = job
    response = client.get(f"/v1/jobs/{job_id}/tiles/4/7/0/0/2/2", params={"format": "png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.mode == "RGBA" and image.size == (256, 256)
    pixels = np.asarray(image)
    values = load_npy(client.get(f"/v1/jobs/{job_id}/tiles/4/7/0/0/2/2").content)
    np.testing.assert_array_equal(pixels, colormap_rgba(values))
    assert (pixels[88:, :, 3] == 0).all() and (pixels[:88, :88, 3] == 255).all()  # transparent outside
    assert tuple(pixels[0, 1, :3]) == VIRIDIS_ANCHORS[0]  # row 512 sees keys up to 512: key 513 is 0
    ones = colormap_rgba(np.asarray([[1.0, 0.5, np.nan]]))
    assert tuple(ones[0, 0, :3]) == VIRIDIS_ANCHORS[-1] and tuple(ones[0, 1, :3]) == VIRIDIS_ANCHORS[4]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("4/7/0/0/3/0", 404, "tile (3, 0) is out of range at level 0: rows and columns 0..2"),
        ("4/7/0/3/0/0", 404, "level 3 is out of range: this pyramid has levels 0..2"),
        ("5/7/0/0/0/0", 404, "layer 5 was not exported; exported layers: 4"),
        ("4/3/0", 404, "head 3 was not exported; exported heads: 2, 7"),
        ("4/7/2", 404, "sequence 2 is not in this bundle: it holds sequences 0..1"),
        ("4/7/0/0/0/0?pool=median", 422, "pool"),
        ("4/7/0/-1/0/0", 422, "level"),
    ],
)
def test_tile_problems(
    client: TestClient, job: tuple[str, np.ndarray], path: str, status: int, message: str
) -> None:
    response = client.get(f"/v1/jobs/{job[0]}/tiles/{path}")
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert message in response.text


def test_derived_bundle_tiles(client: TestClient, submit: Submit, index: Index) -> None:
    spec = SyntheticBundle(lengths=[300], layers=(0,), heads=(0,), chunk_rows=64, derived=True)
    job_id, _ = finished_job(submit, index, spec)
    rows = load_npy(
        client.get(
            f"/v1/jobs/{job_id}/arrays/attention",
            params={"seq": 0, "layer": 0, "head": 0, "query": "256:300"},
        ).content
    )
    tile = load_npy(client.get(f"/v1/jobs/{job_id}/tiles/0/0/0/0/1/1").content)
    np.testing.assert_allclose(tile[:44, :44], rows[:, 256:300], rtol=1e-6)
    top = load_npy(client.get(f"/v1/jobs/{job_id}/tiles/0/0/0/1/0/0").content)
    assert np.isfinite(top[:150, :150]).all() and np.isnan(top[150:]).all()
    np.testing.assert_allclose(
        top[128:150, 128:150], rows.reshape(22, 2, 150, 2).max(axis=(1, 3))[:, 128:150], rtol=1e-6
    )
