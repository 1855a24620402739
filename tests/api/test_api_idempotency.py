"""Idempotency-Key on POST /v1/jobs, and the per-owner limit of jobs in flight (429).

Concurrent duplicates run through the real app (handlers in its thread pool) on SQLite and on
PostgreSQL; Redis shows how many task messages were sent (a replay must not enqueue again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index
from tests.api.support import SMOLLM2, queued_messages

PROBLEM_JSON = "application/problem+json"
SPEC: dict[str, Any] = {"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]}


def _post(client: TestClient, spec: dict[str, Any], key: str | None, **headers: str) -> Any:
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/v1/jobs", json=spec, headers=headers)


def test_same_key_and_spec_returns_the_first_job(
    client: TestClient, broker: redis.Redis, queue_name: str
) -> None:
    first = _post(client, SPEC, "retry-1")
    # the same job spelled differently: defaults written out, keys in another order
    same = {"prompts": SPEC["prompts"], "generation": {"max_new_tokens": 0}, "model": {"id": SMOLLM2}}
    again = _post(client, same, "retry-1")

    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert again.json()["id"] == first.json()["id"]
    assert len(queued_messages(broker, queue_name)) == 1  # enqueued once
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_same_key_with_another_spec_is_422_naming_the_fix(client: TestClient) -> None:
    first = _post(client, SPEC, "retry-2").json()
    other = _post(client, {**SPEC, "prompts": ["something else"]}, "retry-2")

    assert other.status_code == 422
    assert other.headers["content-type"] == PROBLEM_JSON
    body = other.json()
    assert body["type"] == "idempotency-key-reused"
    assert f"already used for job {first['id']}" in body["detail"]
    assert "send a new Idempotency-Key" in body["detail"]
    assert body["extra"]["job_id"] == first["id"]


def test_keys_are_scoped_per_owner_and_optional(client: TestClient, make_key: Callable[..., str]) -> None:
    mine = _post(client, SPEC, "shared-name").json()["id"]
    theirs = _post(client, SPEC, "shared-name", Authorization=f"Bearer {make_key('zoe')}")
    assert theirs.status_code == 202 and theirs.json()["id"] != mine
    without = {_post(client, SPEC, None).json()["id"] for _ in range(2)}
    assert len(without) == 2 and mine not in without


@pytest.mark.parametrize("bad", ["", "x" * 256, "has space", "tab\tkey"])
def test_malformed_idempotency_key_is_422(client: TestClient, bad: str) -> None:
    response = _post(client, SPEC, bad)
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == "header.Idempotency-Key"


def test_dry_run_ignores_the_key(client: TestClient) -> None:
    assert _post(client, SPEC, "dry", **{}).status_code == 202
    dry = client.post(
        "/v1/jobs",
        params={"dry_run": "true"},
        json={**SPEC, "prompts": ["x"]},
        headers={"Idempotency-Key": "dry"},
    )
    assert dry.status_code == 200 and "expected_stored_bytes" in dry.json()


def test_concurrent_duplicates_create_exactly_one_job(
    backend_client: tuple[TestClient, Index], broker: redis.Redis, queue_name: str
) -> None:
    client, _ = backend_client
    n = 16
    barrier = threading.Barrier(n)
    responses: list[Any] = []
    lock = threading.Lock()

    def submit() -> None:
        barrier.wait()
        response = _post(client, SPEC, "double-click")
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(responses) == n
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (n - 1) + [202], [r.text for r in responses if r.status_code >= 300]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get("/v1/jobs").json()["items"]) == 1
    assert len(queued_messages(broker, queue_name)) == 1


@pytest.fixture
def limited(api_settings: ApiSettings, auth_headers: dict[str, str]) -> Iterator[TestClient]:
    app = create_app(api_settings.model_copy(update={"max_jobs_in_flight": 2}))
    with TestClient(app, raise_server_exceptions=False, headers=auth_headers) as test_client:
        yield test_client


def test_jobs_in_flight_limit_is_429_with_the_fix(
    limited: TestClient, make_key: Callable[..., str], index: Index
) -> None:
    ids = [_post(limited, SPEC, f"k{i}").json()["id"] for i in range(2)]
    over = _post(limited, SPEC, None)

    assert over.status_code == 429
    assert over.headers["content-type"] == PROBLEM_JSON
    body = over.json()
    assert body["type"] == "too-many-jobs-in-flight" and body["status"] == 429
    assert "QKVAULT_MAX_JOBS_IN_FLIGHT=2" in body["detail"] and "cancel one" in body["detail"]
    assert body["extra"] == {"limit": 2, "in_flight": 2}

    assert _post(limited, SPEC, "k0").status_code == 200  # a retry of an accepted job still answers
    other = _post(limited, SPEC, None, Authorization=f"Bearer {make_key('yuri')}")
    assert other.status_code == 202  # the limit is per owner
    index.claim(ids[0], "worker-1")
    assert _post(limited, SPEC, None).status_code == 429  # running jobs count
    assert limited.post(f"/v1/jobs/{ids[1]}/cancel").json()["state"] == "cancelled"
    assert _post(limited, SPEC, None).status_code == 202  # a finished job frees its slot
