"""Hub models and the workers' Hugging Face cache (``QKVAULT_HUB_CACHE_DIR``): when the API is told
where that cache is, a hub id missing from it is refused at submission (422 ``model-not-cached``,
naming the cache and how to add the model) instead of failing on the worker; a cached one is read
from there (facts, tokenizer). Unset, a hub id the API cannot see is admitted (tests in
test_api_submit.py / test_api_estimate.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from tests.api.support import TINY_CONFIG

MISSING = "someorg/not-cached-model"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache, also the process's own (HF_HUB_CACHE), as on a worker host."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def client(
    api_settings: ApiSettings, auth_headers: dict[str, str], hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("QKVAULT_HUB_CACHE_DIR", str(hub_cache))
    settings = ApiSettings(**api_settings.model_dump(exclude={"hub_cache_dir"}))  # hub_cache_dir from env
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as test_client:
        yield test_client


def _cache_model(cache: Path, model_id: str, files: dict[str, str]) -> None:
    """The layout huggingface_hub writes: refs/main -> a snapshot folder holding the files."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_hub_model_missing_from_the_workers_cache_is_refused(
    client: TestClient, hub_cache: Path, broker: redis.Redis, queue_name: str
) -> None:
    spec = {"model": {"id": MISSING}, "prompts": ["hi"]}

    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "model-not-cached"
    assert MISSING in body["detail"] and str(hub_cache) in body["detail"]
    assert f"hf download {MISSING}" in body["detail"]
    assert body["errors"][0]["loc"] == "body.model.id"
    assert client.get("/v1/jobs").json()["items"] == [] and broker.llen(queue_name) == 0
    assert client.post("/v1/jobs/estimate", json=spec).json()["type"] == "model-not-cached"


def test_hub_model_in_the_workers_cache_is_admitted_and_estimated(
    client: TestClient, hub_cache: Path
) -> None:
    _cache_model(hub_cache, "someorg/cached-model", {"config.json": json.dumps(TINY_CONFIG)})
    spec = {"model": {"id": "someorg/cached-model"}, "prompts": ["hi"], "capture": {"attention": True}}

    estimate = client.post("/v1/jobs/estimate", json=spec)

    assert estimate.status_code == 200, estimate.text
    attention = next(a for a in estimate.json()["arrays"] if a["name"] == "attention")
    assert attention["shape"][:3] == [2, 1, 4]  # read from the cache: 2 layers, 4 heads
    assert client.post("/v1/jobs", json=spec).status_code == 202
