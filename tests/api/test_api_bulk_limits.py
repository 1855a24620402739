"""A bulk job's whole-job limits and estimate at submission (api/admission.py, storage/sources/sample.py,
storage/jobs/bulkestimate.py), through the real app with real uploads in a local store and the
embedded SmolLM2's tokenizer: sequences counted or estimated, tokens, stored bytes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index
from tests.api.support import SMOLLM2

TEXTS = [f"Row {i}: " + " ".join(["the quick brown fox"] * (1 + i % 7)) for i in range(300)]


@pytest.fixture
def limited(api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]) -> Iterator[Any]:
    """A TestClient factory with some settings changed."""
    opened: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        app = create_app(api_settings.model_copy(update=settings))
        client = TestClient(app, raise_server_exceptions=False, headers=auth_headers)
        opened.append(client.__enter__())
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def _upload(client: TestClient, data: bytes) -> str:
    response = client.post("/v1/uploads", content=data)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _spec(source: dict[str, Any], **capture: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"id": SMOLLM2}, "source": source}
    if capture:
        spec["capture"] = capture
    return spec


def _jsonl() -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()


def test_a_file_job_is_estimated_as_a_whole(limited: Any) -> None:
    client = limited()
    upload = _upload(client, _jsonl())
    source = {"kind": "file", "upload": upload, "format": "jsonl", "offset": 50}
    response = client.post("/v1/jobs/estimate", json=_spec(source, attention=False, summary=True))
    assert response.status_code == 200, response.text
    body = response.json()
    bulk = body["bulk"]
    assert (bulk["sequences"], bulk["sequences_exact"], bulk["sampled_rows"]) == (250, True, 300)
    # the tokens of every row (a small file is read whole), as the tokenizer counts them
    assert bulk["total_tokens"] == body["tokens"]["prompt_total"] > 250 * 5
    assert bulk["micro_batches"] >= 1 and 0 <= bulk["padding_fraction"] <= 0.05
    limits = {limit["name"]: limit for limit in body["limits"]}
    assert limits["max_sequences"]["value"] == 250 and limits["max_job_tokens"]["ok"]
    assert limits["max_stored_bytes"]["value"] == body["expected_stored_bytes"]
    assert any("bulk job" in text for text in body["assumptions"])

    # hidden states of every layer cost far more than the summary, per sequence and in all
    hidden = client.post("/v1/jobs/estimate", json=_spec(source, attention=False, hidden_states=True))
    assert hidden.json()["expected_stored_bytes"] > 10 * body["expected_stored_bytes"]
    # half the rows: about half the bytes
    half = client.post(
        "/v1/jobs/estimate", json=_spec({**source, "limit": 125}, attention=False, summary=True)
    )
    ratio = half.json()["expected_stored_bytes"] / body["expected_stored_bytes"]
    assert 0.4 < ratio < 0.6, ratio


@pytest.mark.parametrize(
    ("settings", "setting", "loc"),
    [
        ({"max_sequences": 200}, "QKVAULT_MAX_SEQUENCES", "body.source"),
        ({"max_job_tokens": 1000}, "QKVAULT_MAX_JOB_TOKENS", "body.source"),
        ({"max_stored_bytes": 1 << 20}, "QKVAULT_MAX_STORED_BYTES", "body.capture"),
    ],
)
def test_whole_job_limits_refuse_before_any_work(
    limited: Any, settings: dict[str, int], setting: str, loc: str
) -> None:
    client = limited(**settings)
    upload = _upload(client, _jsonl())
    source = {"kind": "file", "upload": upload, "format": "jsonl"}
    refused = client.post("/v1/jobs", json=_spec(source, attention=False, hidden_states=True))
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert (body["type"], body["setting"]) == ("limit-exceeded", setting)
    assert body["errors"][0]["loc"] == loc and "source.limit" in body["detail"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing stored, nothing queued
    # the same job over fewer rows fits (or, for the size, a summary-only job)
    smaller = _spec({**source, "limit": 10}, attention=False, summary=True)
    accepted = client.post("/v1/jobs", json=smaller)
    assert accepted.status_code == 202, accepted.text


def test_parquet_rows_are_counted_from_the_metadata(limited: Any) -> None:
    client = limited(max_sequences=4000)
    buffer = io.BytesIO()
    texts = [f"document number {i}" for i in range(5000)]
    pq.write_table(pa.table({"text": texts}), buffer, row_group_size=500)
    upload = _upload(client, buffer.getvalue())
    refused = client.post("/v1/jobs", json=_spec({"kind": "file", "upload": upload, "format": "parquet"}))
    assert refused.status_code == 422 and refused.json()["value"] == 5000
    assert "Parquet metadata" in refused.json()["detail"]
