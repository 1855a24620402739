"""Stored specs outlive spec changes: a job stored by one version lists and reads (200, its spec as
stored) after ``JobSpec`` gains a field, or when the stored spec carries a field this version does not
know (written by a newer version, or a field since removed). Strict validation stays on submission."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from storage.index import Index
from storage.jobs.spec import JobSpec
from tests.api.support import SMOLLM2

TodaysJobSpec = JobSpec  # not replaced by spec_gains_a_field


def _store(index: Index, spec: dict[str, Any], label: str | None = None) -> str:
    """Insert a job as an earlier submission stored it (the API's submit path is not involved)."""
    job = index.create_job(
        spec=spec, owner="local", store_url_for=lambda i: f"/tmp/{i}.zarr", max_attempts=3, label=label
    )
    return job.id


def _todays_spec() -> dict[str, Any]:
    """A spec in today's stored format: validated, defaults filled in, dumped to JSON (as submit does)."""
    spec = TodaysJobSpec.model_validate({"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]})
    return spec.model_dump(mode="json")


class _PrefixCache(BaseModel):
    tokens: int


class _JobSpecWithNewField(JobSpec):
    """The next version's spec: one new required field that today's stored specs lack."""

    prefix_cache: _PrefixCache


@pytest.fixture
def spec_gains_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module that imported ``JobSpec`` sees the next version's spec from now on."""
    for module in list(sys.modules.values()):
        if getattr(module, "JobSpec", None) is JobSpec:
            monkeypatch.setattr(module, "JobSpec", _JobSpecWithNewField)


def _assert_reads(client: TestClient, job_id: str, stored: dict[str, Any]) -> None:
    one = client.get(f"/v1/jobs/{job_id}")
    assert one.status_code == 200, one.text
    assert one.json()["spec"] == stored

    listing = client.get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    (item,) = [item for item in listing.json()["items"] if item["id"] == job_id]
    assert item["spec"] == stored
    assert item == one.json()


def test_stored_spec_reads_after_spec_gains_a_field(
    client: TestClient, index: Index, spec_gains_a_field: None
) -> None:
    stored = _todays_spec()
    job_id = _store(index, stored)

    _assert_reads(client, job_id, stored)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["spec"] == stored


def test_stored_spec_with_unknown_field_reads(client: TestClient, index: Index) -> None:
    """A spec written by a newer version (or holding a field since removed) is shown as stored."""
    stored = {**_todays_spec(), "prefix_cache": {"tokens": 128}}
    stored["generation"] = {**stored["generation"], "min_p": 0.05}
    job_id = _store(index, stored)

    _assert_reads(client, job_id, stored)


def test_stored_spec_of_today_reads_unchanged(client: TestClient, index: Index) -> None:
    """Today's format reads back exactly as stored: same keys, same values, same order."""
    stored = _todays_spec()
    job_id = _store(index, stored)

    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["spec"] == stored
    assert list(body["spec"]) == list(stored)


def test_older_spec_without_a_defaulted_field_reads_with_default(client: TestClient, index: Index) -> None:
    """A spec stored before a field with a default existed reads with the default filled in."""
    stored = _todays_spec()
    older = {key: value for key, value in stored.items() if key != "chat_template"}
    job_id = _store(index, older)

    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["spec"] == stored


def test_submission_stays_strict(client: TestClient) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], "prefix_cache": {"tokens": 128}}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["type"] == "validation-error"


def test_stored_spec_without_a_field_now_required_reads(client: TestClient, index: Index) -> None:
    """The same change seen from the stored side: today's spec lacks a field the current spec requires."""
    stored = {key: value for key, value in _todays_spec().items() if key != "model"}
    job_id = _store(index, stored)

    _assert_reads(client, job_id, stored)
