"""The client's Job reads the API's job document: its fields are the API's (one declaration,
storage.jobs.fields), parsed leniently so that older and newer servers' documents still read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from qkvault.job import Job, Progress
from storage.jobs.fields import JobFields

NOW = "2026-01-02T03:04:05Z"


def test_every_api_field_is_a_client_field() -> None:
    assert list(Job.model_fields) == list(JobFields.model_fields)
    assert set(Progress.model_fields) == set(JobFields.model_fields["progress"].annotation.model_fields)  # type: ignore[union-attr]


def test_api_document_round_trips() -> None:
    api = JobFields(
        id="j",
        owner="alice",
        state="running",
        created_at=datetime(2026, 1, 2, tzinfo=UTC),
        updated_at=datetime(2026, 1, 2, tzinfo=UTC),
        attempts=2,
        max_attempts=3,
        links={"self": "/v1/jobs/j", "bundle": "/v1/jobs/j/bundle"},
        spec={"model": {"id": "m"}, "prompts": ["a"]},
    )
    job = Job.from_api(api.model_dump(mode="json"))
    assert job.model_dump() == {**api.model_dump(), "progress": job.progress.model_dump()}
    assert (job.owner, job.max_attempts, job.links["bundle"]) == ("alice", 3, "/v1/jobs/j/bundle")
    assert not job.terminal and "spec" not in repr(job)


def test_lenient_parsing() -> None:
    doc: dict[str, Any] = {
        "id": "j",
        "state": "paused",  # a state this client does not know
        "created_at": NOW,
        "updated_at": NOW,
        "attempts": "x",  # wrong type: the default
        "progress": {"units_done": 3, "units_total": 6, "fraction": "?"},
        "links": None,
        "a_future_field": {"x": 1},
    }
    job = Job.from_api(doc)
    assert job.state == "paused" and not job.terminal
    assert job.attempts == 0 and job.owner == "" and job.links == {} and job.spec == {}
    assert job.progress.fraction is None and job.progress.ratio == 0.5
    assert job.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert "paused" in str(job) and job.status_line().startswith("[paused]")


@pytest.mark.parametrize("doc", [{}, [], {"state": "queued"}, {"id": "j", "state": "queued"}])
def test_not_a_job_document(doc: Any) -> None:
    with pytest.raises(ValueError, match="not a job document"):
        Job.from_api(doc)
