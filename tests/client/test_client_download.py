"""``Client.download`` against the real API under uvicorn: the zip's Content-Length drives the
percentage shown while downloading (and the truncation check, tests/client/test_client_http.py)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from qkvault.client import Client
from storage.index import Index, JobState
from storage.index.apikeys import ApiKeys
from tests.api.support import SMOLLM2, write_small_bundle
from tests.services import qkvault_env, start_api


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def live_api(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, str, Index]]:
    """The API under uvicorn: (base URL, an API key, the index it uses)."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    index = Index(url)
    index.migrate()
    secret, _ = ApiKeys(index).create(owner="dl")
    queue = f"qkvault-dl-test-{tmp_path.name}"  # no worker: the message stays there; deleted after
    env = qkvault_env(
        redis_url=redis_url, database_url=url, store_url=str(tmp_path / "store"), queue_name=queue
    )
    try:
        with start_api(env, log_path=tmp_path / "api.log") as running:
            yield running.base_url, secret, index
    finally:
        index.dispose()
        broker = redis.Redis.from_url(redis_url)
        broker.delete(queue)
        broker.close()


def test_download_from_the_api_shows_a_percentage(live_api: tuple[str, str, Index], tmp_path: Path) -> None:
    base_url, secret, index = live_api
    with Client(base_url, api_key=secret, timeout_s=10) as client:
        job = client.submit({"model": {"id": SMOLLM2}, "prompts": ["hi"]})
        claimed = index.claim(job.id, "worker-1")
        assert claimed is not None
        write_small_bundle(claimed.store_url)
        index.finish(job.id, JobState.SUCCEEDED)

        out = TtyBuffer()
        path = client.download(job.id, tmp_path / "dl.zip", stream=out)

    assert "100%" in out.getvalue(), out.getvalue()  # the API sent Content-Length
    assert zipfile.ZipFile(path).testzip() is None
