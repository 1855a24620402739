"""App-level behaviour: health, OpenAPI docs, problem documents for every error, body limit,
no torch in the API process, no import-time side effects."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from tests.api.support import SMOLLM2
from tests.services import REPO_ROOT, free_port, qkvault_env, start_api

PROBLEM_JSON = "application/problem+json"


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_and_redis(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_is_503_problem_when_redis_is_down(api_settings: ApiSettings, index: object) -> None:
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == "not-ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("unavailable")


def test_readyz_is_503_when_database_is_not_migrated(api_settings: ApiSettings) -> None:
    with TestClient(create_app(api_settings), raise_server_exceptions=False) as client:
        body = client.get("/readyz").json()
    assert body["status"] == 503
    assert body["checks"]["database"].startswith("unavailable")
    assert body["checks"]["redis"] == "ok"


def test_startup_migrates_when_asked(api_settings: ApiSettings) -> None:
    settings = api_settings.model_copy(update={"migrate_on_startup": True})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200


def test_docs_and_openapi(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()

    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "qkvault"
    assert schema["info"]["version"]
    assert "problem" in schema["info"]["description"]
    paths = schema["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/chunks",
        "/v1/jobs/{job_id}/bundle",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    post = paths["/v1/jobs"]["post"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert {"minimal", "generate"} <= examples.keys()
    assert examples["minimal"]["value"]["model"]["id"] == SMOLLM2
    assert "application/problem+json" in post["responses"]["422"]["content"]
    assert schema["components"]["schemas"]["JobSpec"]["examples"]
    assert "application/zip" in paths["/v1/jobs/{job_id}/bundle"]["get"]["responses"]["200"]["content"]


@pytest.fixture
def unmigrated_client(api_settings: ApiSettings) -> Iterator[TestClient]:
    """An app whose database has no tables: every index query fails with a real SQL error (the
    first one: looking up the well-formed API key it sends)."""
    headers = {"Authorization": "Bearer qk_" + "x" * 43}
    with TestClient(create_app(api_settings), raise_server_exceptions=False, headers=headers) as client:
        yield client


def test_unexpected_error_is_500_problem_without_traceback(
    unmigrated_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="qkvault.api"):
        response = unmigrated_client.get("/v1/jobs")

    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == "internal-error"
    assert body["status"] == 500
    assert body["instance"] == "/v1/jobs"
    text = response.text
    for leak in ("Traceback", "sqlite", "OperationalError", "no such table", 'File "', "SELECT"):
        assert leak not in text, leak
    # ...but the server log has the whole story, under the id the client was given
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def test_unexpected_error_on_submit_is_500_problem(unmigrated_client: TestClient) -> None:
    response = unmigrated_client.post("/v1/jobs", json={"model": {"id": SMOLLM2}, "prompts": ["hi"]})
    assert response.status_code == 500
    assert "Traceback" not in response.text


def test_a_500_leaves_the_keep_alive_connection_usable(tmp_path: Path, redis_url: str) -> None:
    """Under uvicorn, as deployed: after an unexpected error the same connection serves the next
    request. (Starlette's catch-all handler re-raises after sending the 500; uvicorn then closed
    the connection, and a client's next request on it was reset.)"""
    env = qkvault_env(
        redis_url=redis_url,
        database_url=f"sqlite:///{tmp_path / 'unmigrated.db'}",  # no tables: every /v1 request fails
        store_url=str(tmp_path / "store"),
        migrate_on_startup="false",
    )
    headers = {"Authorization": "Bearer qk_" + "x" * 43, "Content-Type": "application/json"}
    spec = json.dumps({"model": {"id": SMOLLM2}, "prompts": ["hi"]})
    with start_api(env, log_path=tmp_path / "api.log") as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        try:
            conn.connect()
            sock = conn.sock
            for method, path, body in [("GET", "/v1/jobs", None), ("POST", "/v1/jobs", spec)]:
                conn.request(method, path, body=body, headers=headers)
                failed = conn.getresponse()
                problem = json.loads(failed.read())
                assert failed.status == 500 and problem["type"] == "internal-error"
                assert failed.getheader("connection") != "close"
                conn.request("GET", "/healthz")  # the next request, on the same connection
                after = conn.getresponse()
                assert after.status == 200 and json.loads(after.read())["status"] == "ok"
                assert conn.sock is sock  # not reconnected
        finally:
            conn.close()
        log = running.log_path.read_text()
    assert problem["error_id"] in log and "Traceback" in log  # the server log has the details


def test_unknown_route_and_wrong_method_are_problems(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM_JSON
    assert missing.json()["type"] == "about:blank"
    assert missing.json()["title"] == "Not Found"

    wrong = client.delete("/v1/jobs")
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == PROBLEM_JSON
    assert wrong.headers["allow"]  # Starlette names the methods of the first matching route only


def test_request_body_over_limit_is_413(api_settings: ApiSettings, auth_headers: dict[str, str]) -> None:
    settings = api_settings.model_copy(update={"max_request_bytes": 2048})
    big_spec = {"model": {"id": SMOLLM2}, "prompts": ["x" * 4096]}
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        declared = client.post("/v1/jobs", json=big_spec)
        streamed = client.post(
            "/v1/jobs",
            content=iter([b'{"prompts": ["', b"x" * 4096, b'"]}']),  # chunked: no Content-Length
            headers={"content-type": "application/json"},
        )
        small = client.post("/v1/jobs", json={"model": {"id": SMOLLM2}, "prompts": ["x"]})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == PROBLEM_JSON
        assert "limit of 2048 bytes" in response.json()["detail"]
        assert response.json()["title"] == "Request Entity Too Large"
    assert "more than 2048" in streamed.json()["detail"]  # counted while streaming in
    assert small.status_code == 202


def test_api_imports_no_torch_and_builds_no_app_at_import(tmp_path: Path) -> None:
    code = f"""
import sys
import api.app, api.routes.jobs, api.routes.health, api.deps, api.schemas, api.problems
assert not hasattr(api.app, "app"), "app object created at import time"
from api.settings import ApiSettings
app = api.app.create_app(ApiSettings(database_url="sqlite:///{tmp_path}/x.db", store_url="{tmp_path}/s"))
app.openapi()
heavy = sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules)
assert not heavy, heavy
assert not (__import__("pathlib").Path("{tmp_path}") / "x.db").exists(), "database opened by create_app"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
