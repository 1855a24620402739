"""submit → poll → bundle zip → xarray, through the real API, Redis, Celery worker and stores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from qkvault.errors import JobFailed, QkvaultClientError
from storage.bundle import open_bundle

from .conftest import Stack

pytestmark = pytest.mark.integration


def _spec(model: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"id": model},
        "prompts": ["The quick brown fox", "Hi"],
        "generation": {"max_new_tokens": 4},
        "capture": {"attention": True, "qkv": True},
        "storage": {"chunk_rows": 16},
    }
    spec.update(extra)
    return spec


def test_submit_poll_download_open(stack: Stack, tiny_llama: str, tmp_path: Path) -> None:
    anonymous = httpx.post(f"{stack.base_url}/v1/jobs", json=_spec(tiny_llama), timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    response = httpx.post(f"{stack.base_url}/v1/jobs", json=_spec(tiny_llama), headers=stack.auth, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"].endswith(f"/v1/jobs/{job_id}")
    job = stack.client.wait(job_id, poll_s=0.2, timeout_s=180, progress=False)
    assert job.state == "succeeded" and job.progress.units_done == job.progress.units_total > 0
    assert job.progress.bytes_written > 0 and job.started_at and job.finished_at
    chunks = httpx.get(f"{stack.base_url}/v1/jobs/{job_id}/chunks", headers=stack.auth, timeout=30).json()
    chunk_list = chunks["items"] if isinstance(chunks, dict) else chunks
    assert len(chunk_list) == job.progress.chunks_written > 0

    zip_path = stack.client.download(job_id, tmp_path / "bundle.zip", progress=False)
    from_zip = open_bundle(zip_path)
    from_store = open_bundle(f"{stack.store_url}/jobs/{job_id}.zarr", storage_options=stack.storage_options)
    assert from_zip.attrs["job_id"] == job_id and from_zip.attrs["complete"] is True
    for name in ("tokens", "length", "attention", "q", "k", "v"):
        np.testing.assert_array_equal(from_zip[name].values, from_store[name].values)
    assert from_zip["attention"].dims == ("layer", "batch", "head", "query", "key")
    lengths = from_zip["length"].values
    assert lengths.tolist() == [len("The quick brown fox") + 1 + 4, 3 + 4]
    rows = from_zip["attention"][:, 0, :, : lengths[0], : lengths[0]].values.astype(np.float32)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=5e-3)

    if stack.store_url.startswith("s3://"):  # straight from S3 through presigned URLs, no API key
        from_presigned = open_bundle(stack.client.download_presigned(job_id, tmp_path / "p", expires_in=60))
        for name in ("tokens", "attention", "q", "k", "v"):
            np.testing.assert_array_equal(from_presigned[name].values, from_store[name].values)
    else:  # a local store is served only through the authenticated API
        with pytest.raises(QkvaultClientError) as refused:
            stack.client.bundle_urls(job_id)
        assert refused.value.status == 409 and refused.value.type == "presigned-urls-unavailable"


def test_listing_paginates(stack: Stack, tiny_llama: str) -> None:
    ids = [stack.client.submit(_spec(tiny_llama, label=f"page-{i}")).id for i in range(3)]
    loads = []
    for job_id in ids:
        done = stack.client.wait(job_id, poll_s=0.2, timeout_s=180, progress=False)
        assert done.result is not None
        loads.append(done.result["timings_s"]["load_model"])
    # one worker process keeps the model loaded across jobs (the first may load it: run first here)
    assert loads[1:] == [0.0, 0.0]
    seen: list[str] = []
    cursor = None
    while True:
        page = stack.client.list(limit=2, cursor=cursor)
        seen += [job.id for job in page]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))


def test_failing_job_ends_failed_with_readable_error(stack: Stack, tmp_path: Path) -> None:
    job = stack.client.submit(_spec(str(tmp_path / "missing-model")))
    with pytest.raises(JobFailed) as failed:
        stack.client.wait(job.id, poll_s=0.2, timeout_s=120, progress=False)
    assert failed.value.job is not None
    error = failed.value.job.error
    assert error is not None and error["type"] == "model-load-failed" and "missing-model" in error["detail"]


def test_prompt_too_long_is_refused_at_submission(local_stack: Stack, tiny_llama: str) -> None:
    """The API counts tokens with the model's tokenizer and refuses before a GPU is used (a job
    whose tokenizer the API cannot read fails on the worker instead: tests/worker/test_jobs.py)."""
    from qkvault.errors import QkvaultClientError

    with pytest.raises(QkvaultClientError) as refused:
        local_stack.client.submit(_spec(tiny_llama, prompts=["x" * 400]))
    assert refused.value.status == 422 and "too long" in str(refused.value)


def test_invalid_spec_gets_field_level_422(local_stack: Stack) -> None:
    response = httpx.post(
        f"{local_stack.base_url}/v1/jobs",
        json={"model": {"id": "a/b"}, "prompts": [], "generation": {"max_new_tokens": -1}},
        headers=local_stack.auth,
        timeout=30,
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    fields = {e["loc"] for e in response.json()["errors"]}
    assert {"body.prompts", "body.generation.max_new_tokens"} <= fields


def test_cancel_running_and_queued_jobs(local_stack: Stack, long_llama: str) -> None:
    client = local_stack.client
    long_spec = _spec(
        long_llama,
        prompts=["a"],
        generation={"max_new_tokens": 4000, "stop_at_eos": False},
        capture={"attention": True},
        storage={"chunk_rows": 64},
    )
    running = client.submit(long_spec)
    queued = client.submit(_spec(long_llama))  # concurrency 1: waits behind the long job
    deadline = time.monotonic() + 120
    while client.get(running.id).progress.units_done < 10:
        assert time.monotonic() < deadline, "long job never started"
        time.sleep(0.2)
    assert client.get(queued.id).state == "queued"
    assert client.cancel(queued.id).state == "cancelled"
    assert client.cancel(running.id).state in ("cancelling", "cancelled")
    final = client.wait(running.id, poll_s=0.2, timeout_s=120, progress=False)
    assert final.state == "cancelled" and final.partial
    assert final.progress.units_done < final.progress.units_total
    bundle = open_bundle(f"{local_stack.store_url}/jobs/{running.id}.zarr")
    assert bundle.attrs["partial"] is True and bundle["attention"][0, 0, :, :64, :64].values.any()
    # The queued job's message reaches the idle worker later and is dropped: it stays cancelled.
    time.sleep(1.0)
    assert client.get(queued.id).state == "cancelled"
    with pytest.raises(Exception, match=r"409|not ready|cancelled|partial"):
        client.download(queued.id, progress=False)


@pytest.mark.slow
def test_smollm2_through_the_service(local_stack: Stack, tmp_path: Path) -> None:
    from storage.models.spec import SMOLLM2_GGUF

    spec = _spec(
        SMOLLM2_GGUF, capture={"attention": True, "qkv": True, "layers": [0, 29]}, storage={"chunk_rows": 256}
    )
    job = local_stack.client.submit(spec)
    done = local_stack.client.wait(job.id, poll_s=0.5, timeout_s=600, progress=False)
    assert done.state == "succeeded"
    ds = local_stack.client.open(job.id, download_dir=tmp_path, progress=False)
    assert ds.attrs["model"]["num_layers"] == 30 and ds["layer"].values.tolist() == [0, 29]
    assert ds.sizes["head"] == 9 and ds.sizes["kv_head"] == 3 and ds.sizes["head_dim"] == 64
