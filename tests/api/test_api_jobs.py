"""GET /v1/jobs[/{id}], cancel, chunks: job states are driven through the index as a worker would.
(Ownership and authentication: test_api_auth.py.)"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from storage.index import ChunkRecord, Index, JobState

PROBLEM_JSON = "application/problem+json"
Submit = Callable[..., dict[str, Any]]


def _cursor(created_at: str, job_id: str) -> str:
    """A cursor as the API encodes one, of any content (JSON escapes a lone surrogate)."""
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).rstrip(b"=").decode()


def test_get_unknown_job_is_404_problem(client: TestClient) -> None:
    response = client.get("/v1/jobs/00000000-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == "job-not-found"
    assert body["status"] == 404
    assert body["instance"] == "/v1/jobs/00000000-0000-4000-8000-000000000000"
    assert "not found" in body["detail"]


def test_get_job_shows_progress(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    assert index.claim(job_id, "worker-1") is not None
    index.update_progress(job_id, units_done=3, units_total=12, phase="prefill")

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["state"] == "running"
    assert body["phase"] == "prefill"
    assert body["attempts"] == 1
    assert body["started_at"] is not None and body["heartbeat_at"] is not None
    assert body["progress"]["units_done"] == 3 and body["progress"]["units_total"] == 12
    assert body["progress"]["fraction"] == pytest.approx(0.25)


def test_a_job_given_back_shows_its_failure_while_queued(
    client: TestClient, submit: Submit, index: Index
) -> None:
    """A worker gave the job back (store down, disk full, read-only): ``queued`` with the failure in
    ``error``, ``retrying: true``, until the job ends."""
    job_id = submit()["id"]
    assert index.claim(job_id, "worker-1") is not None
    problem = {
        "type": "store-not-writable",
        "title": "StoreNotWritable",
        "detail": "store not writable: no space left on device (ENOSPC) on write zarr.json in /d/x.zarr",
        "extra": {"resource": "/d/x.zarr", "errno": "ENOSPC", "fix": "free space on /d"},
        "attempts": 1,
        "max_attempts": 3,
        "retrying": True,
    }
    assert index.release(job_id, "worker-1", error=problem) is JobState.QUEUED

    body = client.get(f"/v1/jobs/{job_id}").json()
    assert (body["state"], body["attempts"], body["error"]) == ("queued", 1, problem)
    listed = client.get("/v1/jobs", params={"state": "queued"}).json()["items"]
    assert [job["error"] for job in listed if job["id"] == job_id] == [problem]

    assert index.claim(job_id, "worker-2") is not None  # the next attempt succeeds: error cleared
    index.finish(job_id, JobState.SUCCEEDED, worker="worker-2")
    assert client.get(f"/v1/jobs/{job_id}").json()["error"] is None


def test_list_paginates_newest_first_with_cursor(client: TestClient, submit: Submit) -> None:
    submitted = [submit(label=f"job {i}")["id"] for i in range(5)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == submitted[::-1]
    assert client.get("/v1/jobs").json()["next_cursor"] is None  # default page holds all five


def test_list_filters_by_state(client: TestClient, submit: Submit) -> None:
    ids = [submit()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")

    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()["items"]
    queued = client.get("/v1/jobs", params={"state": "queued"}).json()["items"]

    assert [j["id"] for j in cancelled] == [ids[1]]
    assert {j["id"] for j in queued} == {ids[0], ids[2]}


@pytest.mark.parametrize(
    ("params", "status", "type_", "loc"),
    [
        ({"cursor": "not-a-cursor"}, 400, "invalid-cursor", None),
        # decodes, but the time is before datetime.min in UTC (OverflowError when bound: a 500 before)
        ({"cursor": _cursor("0001-01-01T00:00:00+01:00", "x")}, 400, "invalid-cursor", None),
        ({"cursor": _cursor("2030-01-02T03:04:05+00:00", "a\ud800b")}, 400, "invalid-cursor", None),
        ({"limit": 0}, 422, "validation-error", "query.limit"),
        ({"limit": 201}, 422, "validation-error", "query.limit"),
        ({"state": "sleeping"}, 422, "validation-error", "query.state"),
    ],
)
def test_list_rejects_bad_query(
    client: TestClient, params: dict[str, Any], status: int, type_: str, loc: str | None
) -> None:
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == type_
    if loc:
        assert body["errors"][0]["loc"] == loc


def test_cancel_queued_job_then_cancel_again_conflicts(client: TestClient, submit: Submit) -> None:
    job_id = submit()["id"]

    response = client.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "cancelled"
    assert body["cancel_requested"] is True
    assert body["finished_at"] is not None
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"

    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == PROBLEM_JSON
    assert again.json()["type"] == "job-state-conflict"
    assert "already cancelled" in again.json()["detail"]


def test_cancel_running_job_becomes_cancelling(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")

    body = client.post(f"/v1/jobs/{job_id}/cancel").json()

    assert body["state"] == "cancelling"
    assert body["cancel_requested"] is True
    assert index.is_cancel_requested(job_id)


def test_cancel_finished_job_conflicts(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")
    index.finish(job_id, JobState.SUCCEEDED, result={"tokens": 5})

    response = client.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 409
    assert response.json()["type"] == "job-state-conflict"
    assert client.get(f"/v1/jobs/{job_id}").json()["result"] == {"tokens": 5}


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_chunks_lists_index_rows(client: TestClient, submit: Submit, index: Index) -> None:
    job_id = submit()["id"]
    index.claim(job_id, "worker-1")
    index.record_chunks(
        job_id,
        [
            ChunkRecord("attention", (0, 0, 0, 10, 0), "attention/c/0/0/0/10/0", 100, "sha256:aa"),
            ChunkRecord("attention", (0, 0, 0, 2, 0), "attention/c/0/0/0/2/0", 120, "sha256:bb"),
            ChunkRecord("tokens", (0, 0), "tokens/c/0/0", 40, "sha256:cc"),
        ],
    )

    all_chunks = client.get(f"/v1/jobs/{job_id}/chunks").json()
    attention = client.get(f"/v1/jobs/{job_id}/chunks", params={"array": "attention"}).json()

    assert [c["key"] for c in all_chunks] == [
        "attention/c/0/0/0/2/0",
        "attention/c/0/0/0/10/0",
        "tokens/c/0/0",
    ]
    assert attention[0] == {
        "array": "attention",
        "coords": [0, 0, 0, 2, 0],
        "key": "attention/c/0/0/0/2/0",
        "nbytes": 120,
        "checksum": "sha256:bb",
    }
    assert len(attention) == 2
    progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert (progress["chunks_written"], progress["bytes_written"]) == (3, 260)


def test_chunks_of_unknown_job_is_404(client: TestClient) -> None:
    assert client.get("/v1/jobs/nope/chunks").status_code == 404


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs/a%00b", "/v1/jobs/a%00b/cancel", "/v1/jobs/{id}/chunks?array=a%00b"],
    ids=["job-id", "job-id-cancel", "chunks-array"],
)
def test_nul_in_a_job_id_or_array_name_is_422_on_every_database(
    backend_client: tuple[TestClient, Index], path: str
) -> None:
    """PostgreSQL refuses NUL in text (a 500 before); SQLite took it. Refused before any query."""
    client, _ = backend_client
    job = client.post("/v1/jobs", json={"model": {"id": "qkvault-test-org/m"}, "prompts": ["hi"]})
    assert job.status_code == 202, job.text
    url = path.format(id=job.json()["id"])

    response = client.post(url) if url.endswith("/cancel") else client.get(url)

    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["loc"] in {"path.job_id", "query.array"}
    assert "NUL character (U+0000) at character 1" in error["msg"] and "remove it" in error["msg"]
