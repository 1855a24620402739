"""Admission of model placement (``model.device_map``/``num_gpus``/``max_memory_gib``/``quantization``)
against what the live workers of the API's queue report in Redis (real Redis; one test with a real
``python -m worker`` process that reports itself and fails a job it cannot place)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from api.settings import ApiSettings
from storage.index import Index, JobState
from storage.models.placement import GIB, GpuInfo, WorkerCapabilities
from storage.models.workers import live_reports, publish, report_key
from tests.api.support import write_tiny_model
from tests.faults import wait_until
from tests.services import qkvault_env, start_worker

H200 = WorkerCapabilities(
    device="cuda",
    gpus=(GpuInfo(0, "NVIDIA H200", 140 * GIB), GpuInfo(1, "NVIDIA H200", 140 * GIB)),
    accelerate="1.16.0",
    bitsandbytes=None,
    torch="2.11.0",
)


def _spec(model_id: str, **model: Any) -> dict[str, Any]:
    return {"model": {"id": model_id, **model}, "prompts": ["The capital of France is"]}


def _refusal(response: Any, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("placement-unavailable") and body["title"] == "Placement unavailable"
    assert f"body.{field}" in [e["loc"] for e in body["errors"]], body
    assert "Fix:" in body["detail"] and "docs/operations.md" in body["detail"]
    return body


def test_placement_is_admitted_only_when_a_live_worker_has_it(
    client: TestClient, api_settings: ApiSettings, tmp_path: Path, redis_url: str
) -> None:
    model = write_tiny_model(tmp_path / "tiny")
    broker = redis.Redis.from_url(redis_url)
    queue = api_settings.queue_name
    two_gpus = _spec(model, device_map="auto", num_gpus=2)
    four_gpus = _spec(model, device_map="auto", num_gpus=4)

    # nothing reported yet: admitted (the worker checks before loading)
    assert client.post("/v1/jobs?dry_run=true", json=four_gpus).status_code == 200
    # a worker of another queue does not count
    publish(broker, queue + "-other", "elsewhere:1", H200, ttl_s=60)
    assert client.post("/v1/jobs?dry_run=true", json=four_gpus).status_code == 200

    publish(broker, queue, "gpu-node:7", H200, ttl_s=60)
    assert [w for w, _ in live_reports(broker, queue)] == ["gpu-node:7"]
    assert client.post("/v1/jobs", json=two_gpus).status_code == 202
    body = _refusal(client.post("/v1/jobs", json=four_gpus), "model.num_gpus")
    assert "spread over 4 GPU(s) but the worker has 2" in body["detail"] and body["max_gpus"] == 2
    body = _refusal(
        client.post("/v1/jobs", json=_spec(model, device_map="auto", max_memory_gib={"1": 200})),
        "model.max_memory_gib",
    )
    assert "exceeds GPU 1's 140.0 GiB" in body["detail"]
    body = _refusal(
        client.post("/v1/jobs", json=_spec(model, quantization={"bits": 4})), "model.quantization"
    )
    assert "needs the Python package bitsandbytes" in body["detail"]
    # the estimate route does not refuse (it only reports what the job would be)
    assert client.post("/v1/jobs/estimate", json=four_gpus).status_code != 422

    # a second worker with bitsandbytes: 4-bit weights admitted now
    publish(
        broker,
        queue,
        "gpu-node:8",
        WorkerCapabilities(device="cpu", accelerate="1", bitsandbytes="0.50.2"),
        60,
    )
    assert (
        client.post("/v1/jobs?dry_run=true", json=_spec(model, quantization={"bits": 4})).status_code == 200
    )

    # reports expire: with none live, the job is admitted again
    for worker in ("gpu-node:7", "gpu-node:8"):
        broker.pexpire(report_key(queue, worker), 1)
    assert wait_until(lambda: not live_reports(broker, queue), 5)
    assert client.post("/v1/jobs?dry_run=true", json=four_gpus).status_code == 200
    broker.close()


def test_a_real_worker_reports_its_queues_and_leaves_a_job_it_cannot_place_waiting(
    client: TestClient, api_settings: ApiSettings, index: Index, tmp_path: Path, redis_url: str
) -> None:
    """Submitted before any worker reported: admitted, into the queue of its route
    (``<queue>.gpus-2``). The worker (no GPU here) reports what it has and the queues it consumes
    (not that one): the job stays queued, its message waiting; the next such job is refused."""
    model = write_tiny_model(tmp_path / "tiny")
    spec = _spec(model, device_map="auto", num_gpus=2)
    first = client.post("/v1/jobs", json=spec)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    queue = api_settings.queue_name
    env = qkvault_env(
        redis_url=redis_url,
        database_url=api_settings.database_url,
        store_url=api_settings.store_url,
        model_roots=[tmp_path],
        queue_name=queue,
        device="cpu",
        heartbeat_interval_s=1,
        lease_timeout_s=30,
    )
    broker = redis.Redis.from_url(redis_url)

    def report() -> dict[str, Any]:
        ((worker, _),) = live_reports(broker, queue)
        raw = broker.get(report_key(queue, worker))
        assert raw is not None and 0 < broker.ttl(report_key(queue, worker)) <= 30
        doc: dict[str, Any] = json.loads(raw)
        return doc

    with start_worker(env, tmp_path / "worker.log"):
        # subscribed to the queues of its routes once its pool child probed what it has
        assert wait_until(lambda: bool(live_reports(broker, queue)) and len(report()["queues"]) > 1, 60, 0.2)
        ((_, caps),) = live_reports(broker, queue)
        assert caps.device == "cpu" and caps.gpus == () and caps.accelerate is not None
        doc = report()
        assert doc["reported_at"] <= time.time()
        bnb = [f"{queue}.bnb"] if caps.bitsandbytes else []
        assert doc["queues"] == [queue, f"{queue}.accelerate", *bnb]

        # the job waits in its own queue, which no live worker consumes
        assert broker.llen(f"{queue}.gpus-2") == 1
        assert index.get_job(job_id).state is JobState.QUEUED

        _refusal(client.post("/v1/jobs", json=spec), "model.num_gpus")
        if caps.bitsandbytes is None:
            _refusal(
                client.post("/v1/jobs", json=_spec(model, quantization={"bits": 8})), "model.quantization"
            )
        assert client.post("/v1/jobs?dry_run=true", json=_spec(model, device_map="auto")).status_code == 200
    # a worker stopped cleanly withdraws its report
    assert wait_until(lambda: not live_reports(broker, api_settings.queue_name), 10, 0.2)
    broker.delete(f"{queue}.gpus-2")
    broker.close()
