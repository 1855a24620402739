"""Authentication and ownership: nobody reads another user's data.

- every protected route (taken from the app itself, so a new route is covered automatically) x
  {no key, wrong scheme, unknown key, revoked key} -> 401 problem with ``WWW-Authenticate: Bearer``;
- every route that takes a job id x another owner's job -> 404, the very document a missing id
  gets (only the id differs);
- an admin key sees and cancels everyone's jobs; health, readiness and the docs stay public.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index, JobState
from storage.index.apikeys import ApiKeys
from tests.api.support import SMOLLM2, write_small_bundle

PROBLEM_JSON = "application/problem+json"
SPEC: dict[str, Any] = {"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]}
MISSING_ID = "00000000-0000-4000-8000-000000000000"
PUBLIC_PATHS = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
# every route that takes a job id: (method, path template)
JOB_ROUTES = [
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/chunks"),
    ("GET", "/v1/jobs/{job_id}/bundle"),
    ("GET", "/v1/jobs/{job_id}/bundle/urls"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/jobs/{job_id}/arrays"),
    ("GET", "/v1/jobs/{job_id}/arrays/{name}"),
    ("GET", "/v1/jobs/{job_id}/tiles/{layer}/{head}/{seq}"),
    ("GET", "/v1/jobs/{job_id}/tiles/{layer}/{head}/{seq}/{level}/{row}/{col}"),
]
# the other path parameters of the job routes, filled with plausible values
PATH_VALUES = {"{name}": "attention", "{layer}": "0", "{head}": "1", "{seq}": "0", "{level}": "2"}
PATH_VALUES |= {"{row}": "0", "{col}": "0"}


def _fill(template: str, job_id: str) -> str:
    """A job route's path: ``job_id`` and plausible values for its other parameters."""
    path = template.replace("{job_id}", job_id)
    for placeholder, value in PATH_VALUES.items():
        path = path.replace(placeholder, value)
    return path


@pytest.fixture
def anonymous(api_settings: ApiSettings, index: Index) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _protected_routes(app: Any) -> list[tuple[str, str]]:
    """Every operation of the app but the public ones (from its OpenAPI document: no route of this
    app is hidden from the schema)."""
    paths = app.openapi()["paths"]
    return sorted(
        (method.upper(), path) for path, ops in paths.items() if path not in PUBLIC_PATHS for method in ops
    )


def _call(client: TestClient, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    body = SPEC if method == "POST" and not path.endswith("/cancel") else None
    return client.request(method, path, json=body, headers=headers)


def test_route_list_is_complete(anonymous: TestClient) -> None:
    """The matrices below cover every route the app has: a new route fails here until listed."""
    documented = {path for path in anonymous.app.openapi()["paths"]}  # type: ignore[attr-defined]
    assert documented == {p for _, p in _protected_routes(anonymous.app)} | {"/healthz", "/readyz"}
    routes = _protected_routes(anonymous.app)
    with_job_id = {(m, p) for m, p in routes if "{job_id}" in p}
    assert with_job_id == set(JOB_ROUTES)
    assert {p for _, p in routes} - {p for _, p in JOB_ROUTES} == {
        "/v1/jobs",
        "/v1/jobs/estimate",
        "/v1/uploads",  # uploads: another owner's id is tested in test_api_uploads.py
        "/v1/uploads/{upload_id}",
    }


@pytest.mark.parametrize("credentials", ["none", "wrong-scheme", "unknown", "malformed", "revoked"])
def test_every_protected_route_needs_a_valid_key(
    anonymous: TestClient, make_key: Callable[..., str], index: Index, credentials: str
) -> None:
    headers: dict[str, str] = {}
    if credentials == "wrong-scheme":
        headers = {"Authorization": "Basic YWxpY2U6c2VjcmV0"}
    elif credentials == "unknown":
        headers = _bearer("qk_" + "A" * 43)
    elif credentials == "malformed":
        headers = _bearer("not a key at all")
    elif credentials == "revoked":
        secret = make_key("local")
        assert anonymous.get("/v1/jobs", headers=_bearer(secret)).status_code == 200
        keys = ApiKeys(index)
        found = keys.authenticate(secret)
        assert found is not None
        keys.revoke(found.id)
        headers = _bearer(secret)

    routes = _protected_routes(anonymous.app)
    assert len(routes) == 16
    for method, template in routes:
        path = _fill(template, MISSING_ID).replace("{upload_id}", MISSING_ID.replace("-", ""))
        response = _call(anonymous, method, path, headers)
        where = f"{method} {path} with {credentials} credentials"
        assert response.status_code == 401, f"{where}: {response.status_code} {response.text}"
        assert response.headers["content-type"] == PROBLEM_JSON, where
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="qkvault"'), where
        assert ('error="invalid_token"' in challenge) == (credentials in {"unknown", "malformed", "revoked"})
        body = response.json()
        assert body["type"] == "unauthenticated" and body["status"] == 401 and body["instance"] == path
        assert "qkvault keys create" in body["detail"], body["detail"]


def test_401_comes_before_validation_and_lookup(anonymous: TestClient) -> None:
    """No key: nothing about the request is checked or revealed (a bad body, an absurd id)."""
    assert anonymous.post("/v1/jobs", json={"prompts": []}).status_code == 401
    assert anonymous.get("/v1/jobs/" + "x" * 100).status_code == 401
    assert anonymous.get("/v1/jobs", params={"limit": 0}).status_code == 401


def test_public_endpoints_need_no_key(anonymous: TestClient) -> None:
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 200
    assert anonymous.get("/docs").status_code == 200
    schema = anonymous.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "qk_<43 characters>",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            expected: list[dict[str, list[str]]] | None = None if path in PUBLIC_PATHS else [{"ApiKey": []}]
            assert operation.get("security") == expected, (method, path)
            if expected:
                assert "401" in operation["responses"], (method, path)


def _normalised(response: Any, job_id: str) -> tuple[int, str, str]:
    return response.status_code, response.headers["content-type"], response.text.replace(job_id, "<ID>")


@pytest.fixture
def alices_finished_job(
    anonymous: TestClient, make_key: Callable[..., str], index: Index
) -> tuple[str, dict[str, str]]:
    """A succeeded job of alice with a bundle: for alice every route answers 200, 409 or so."""
    alice = _bearer(make_key("alice"))
    job_id = anonymous.post("/v1/jobs", json=SPEC, headers=alice).json()["id"]
    job = index.claim(job_id, "worker-1")
    assert job is not None
    write_small_bundle(job.store_url)
    index.finish(job_id, JobState.SUCCEEDED)
    return job_id, alice


@pytest.mark.parametrize(("method", "template"), JOB_ROUTES)
def test_another_users_job_is_indistinguishable_from_a_missing_one(
    anonymous: TestClient,
    make_key: Callable[..., str],
    alices_finished_job: tuple[str, dict[str, str]],
    method: str,
    template: str,
) -> None:
    job_id, alice = alices_finished_job
    bob = _bearer(make_key("bob"))
    path = _fill(template, job_id)

    as_owner = _call(anonymous, method, path, alice)
    as_bob = _call(anonymous, method, path, bob)
    missing = _call(anonymous, method, _fill(template, MISSING_ID), bob)

    assert as_owner.status_code != 404, as_owner.text  # the job exists and alice reaches it
    assert as_bob.status_code == 404
    assert as_bob.json()["type"] == "job-not-found"
    assert _normalised(as_bob, job_id) == _normalised(missing, MISSING_ID)
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=alice).json()["state"] == "succeeded"  # untouched


def test_lists_show_only_my_jobs_and_admin_sees_all(
    anonymous: TestClient, make_key: Callable[..., str], index: Index
) -> None:
    alice, bob = _bearer(make_key("alice")), _bearer(make_key("bob"))
    admin = _bearer(make_key("ops", admin=True))
    a_ids = {anonymous.post("/v1/jobs", json=SPEC, headers=alice).json()["id"] for _ in range(2)}
    b_job = anonymous.post("/v1/jobs", json=SPEC, headers=bob).json()
    assert b_job["owner"] == "bob"

    assert {j["id"] for j in anonymous.get("/v1/jobs", headers=alice).json()["items"]} == a_ids
    assert [j["id"] for j in anonymous.get("/v1/jobs", headers=bob).json()["items"]] == [b_job["id"]]
    everyone = anonymous.get("/v1/jobs", headers=admin).json()["items"]
    assert {j["id"] for j in everyone} == a_ids | {b_job["id"]}
    assert {j["owner"] for j in everyone} == {"alice", "bob"}

    # an admin reads and cancels any job; the job keeps its owner
    assert anonymous.get(f"/v1/jobs/{b_job['id']}", headers=admin).json()["owner"] == "bob"
    assert anonymous.get(f"/v1/jobs/{b_job['id']}/chunks", headers=admin).status_code == 200
    cancelled = anonymous.post(f"/v1/jobs/{b_job['id']}/cancel", headers=admin)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    assert anonymous.get(f"/v1/jobs/{b_job['id']}", headers=bob).json()["state"] == "cancelled"
    # ...but a plain key of the same owner name as nobody else sees nothing extra
    assert anonymous.get("/v1/jobs", headers=_bearer(make_key("ops"))).json()["items"] == []


def test_revoking_a_key_stops_it_at_once_and_keeps_the_jobs(
    anonymous: TestClient, make_key: Callable[..., str], index: Index
) -> None:
    first, second = make_key("carol"), make_key("carol")
    job_id = anonymous.post("/v1/jobs", json=SPEC, headers=_bearer(first)).json()["id"]
    keys = ApiKeys(index)
    record = keys.authenticate(first)
    assert record is not None
    keys.revoke(record.id)
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=_bearer(first)).status_code == 401
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=_bearer(second)).json()["owner"] == "carol"
