"""The client against a tiny real HTTP server (http.server in a thread on 127.0.0.1): problem
documents become QkvaultClientError, jobs parse, wait/download/open behave. Nothing is mocked."""

from __future__ import annotations

import io
import json
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qkvault.client import Client
from qkvault.embedded import free_port
from qkvault.errors import JobFailed, QkvaultClientError, WaitTimeout
from qkvault.job import Job

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).isoformat()

VALIDATION_PROBLEM = {
    "type": "validation-error",
    "title": "Invalid job spec",
    "status": 422,
    "detail": "2 validation errors",
    "errors": [
        {"loc": ["body", "prompts"], "msg": "List should have at least 1 item", "type": "too_short"},
        {"loc": ["body", "capture", "layers", 0], "msg": "indices must be >= 0", "type": "value_error"},
    ],
}
FAILURE_PROBLEM = {
    "type": "model-load-failed",
    "title": "ModelLoadError",
    "status": 422,
    "detail": "cannot load gguf: file truncated",
}
# what GET /v1/jobs/progress answers on successive polls
PROGRESS_STEPS: list[dict[str, Any]] = [
    {"state": "queued"},
    {
        "state": "running",
        "phase": "prefill",
        "progress": {"units_done": 12, "units_total": 60, "fraction": 0.2, "bytes_written": 3_400_000},
    },
    {
        "state": "running",
        "phase": "prefill",
        "progress": {"units_done": 12, "units_total": 60, "fraction": 0.2, "bytes_written": 3_400_000},
    },
    {
        "state": "running",
        "phase": "decoding",
        "progress": {"units_done": 48, "units_total": 60, "fraction": 0.8, "bytes_written": 9_100_000},
    },
    {
        "state": "succeeded",
        "phase": "finalizing",
        "progress": {
            "units_done": 60,
            "units_total": 60,
            "fraction": 1.0,
            "bytes_written": 11_000_000,
            "chunks_written": 90,
        },
    },
]


def job_doc(job_id: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "label": "demo <b>",
        "created_at": NOW,
        "started_at": NOW,
        "finished_at": None,
        "updated_at": NOW,
        "attempts": 1,
        "phase": None,
        "progress": {
            "units_done": 0,
            "units_total": 0,
            "fraction": None,
            "bytes_written": 0,
            "chunks_written": 0,
        },
        "error": None,
        "partial": False,
        "cancel_requested": False,
        "result": None,
        "links": {"self": f"/v1/jobs/{job_id}", "bundle": f"/v1/jobs/{job_id}/bundle"},
        "spec": {"model": {"id": "m"}, "prompts": ["a", "b"]},
        "some_future_field": 1,
    }
    doc.update(extra)
    return doc


class FakeApi:
    def __init__(self, bundle_zip: bytes) -> None:
        self.bundle_zip = bundle_zip
        self.polls: dict[str, int] = {}
        self.requests: list[str] = []


def make_handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(
            self,
            status: int,
            body: Any,
            ctype: str = "application/json",
            headers: dict[str, str] | None = None,
        ) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _problem(self, status: int, problem: dict[str, Any]) -> None:
            self._send(status, problem, "application/problem+json")

        def do_GET(self) -> None:
            api.requests.append(f"GET {self.path}")
            path = self.path.partition("?")[0]
            if path == "/healthz":
                return self._send(200, {"status": "ok"})
            if path == "/v1/jobs":
                items = [job_doc("a", "succeeded"), job_doc("b", "running")]
                return self._send(200, {"items": items, "next_cursor": "cursor-2"})
            match = re.fullmatch(r"/v1/jobs/([^/]+)(/bundle)?", path)
            if not match:
                return self._problem(404, {"type": "not-found", "title": "Not Found", "status": 404})
            job_id, bundle = match[1], match[2]
            if bundle:
                if job_id == "done":
                    return self._send(200, api.bundle_zip, "application/zip")
                if job_id == "short":  # declares the whole zip, sends half of it, hangs up
                    self.send_response(200)
                    self.send_header("Content-Type", "application/zip")
                    self.send_header("Content-Length", str(len(api.bundle_zip)))
                    self.end_headers()
                    self.wfile.write(api.bundle_zip[: len(api.bundle_zip) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                problem = {
                    "type": "bundle-not-ready",
                    "title": "BundleNotReady",
                    "status": 409,
                    "detail": f"job {job_id} is running: the bundle is ready once it ends",
                }
                return self._problem(409, problem)
            if job_id == "missing":
                return self._problem(
                    404,
                    {
                        "type": "job-not-found",
                        "title": "JobNotFound",
                        "status": 404,
                        "detail": "job missing not found",
                    },
                )
            if job_id == "plain":
                return self._send(500, b"boom", "text/plain")
            if job_id == "slow":
                time.sleep(1.5)
            if job_id == "failed":
                return self._send(200, job_doc("failed", "failed", error=FAILURE_PROBLEM, finished_at=NOW))
            if job_id == "progress":
                n = api.polls.get(job_id, 0)
                api.polls[job_id] = n + 1
                return self._send(200, job_doc("progress", **PROGRESS_STEPS[min(n, len(PROGRESS_STEPS) - 1)]))
            return self._send(200, job_doc(job_id))

        def do_POST(self) -> None:
            api.requests.append(f"POST {self.path}")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if self.path == "/v1/jobs":
                if not body.get("prompts"):
                    return self._problem(422, VALIDATION_PROBLEM)
                doc = job_doc("new", "queued", spec=body)
                return self._send(202, doc, headers={"Location": "/v1/jobs/new"})
            match = re.fullmatch(r"/v1/jobs/([^/]+)/cancel", self.path)
            if match:
                return self._send(202, job_doc(match[1], "cancelling", cancel_requested=True))
            return self._problem(404, {"type": "not-found", "title": "Not Found", "status": 404})

    return Handler


@pytest.fixture
def api(make_bundle: Callable[..., Path]) -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi(make_bundle("zip").read_bytes())
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_problem_document_becomes_client_error(api: tuple[FakeApi, str]) -> None:
    _, url = api
    with Client(url, timeout_s=5) as client, pytest.raises(QkvaultClientError) as info:
        client.submit({"model": {"id": "m"}, "prompts": []})
    err = info.value
    assert (err.status, err.type, err.title, err.detail) == (
        422,
        "validation-error",
        "Invalid job spec",
        "2 validation errors",
    )
    assert err.errors is not None and len(err.errors) == 2
    assert err.problem == VALIDATION_PROBLEM
    message = str(err)
    assert message.startswith("422 Invalid job spec: 2 validation errors")
    assert "  - prompts: List should have at least 1 item" in message
    assert "  - capture.layers.0: indices must be >= 0" in message
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.status, clone.errors, str(clone)) == (422, err.errors, message)


def test_other_errors(api: tuple[FakeApi, str]) -> None:
    _, url = api
    client = Client(url, timeout_s=5)
    with pytest.raises(QkvaultClientError) as info:
        client.get("missing")
    err = info.value
    assert (err.status, err.type, err.detail) == (404, "job-not-found", "job missing not found")
    with pytest.raises(QkvaultClientError) as info:
        client.get("plain")  # not a problem document: status and body still come through
    assert (info.value.status, info.value.title, info.value.detail) == (500, "Internal Server Error", "boom")


def test_timeout_and_unreachable_are_client_errors(api: tuple[FakeApi, str]) -> None:
    _, url = api
    with pytest.raises(QkvaultClientError, match=r"within 0\.3 s") as info:
        Client(url, timeout_s=0.3).get("slow")
    assert info.value.status is None
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(QkvaultClientError, match="cannot reach the qkvault API") as info:
        Client(dead, timeout_s=2).get("x")
    assert info.value.status is None


def test_submit_get_list_cancel(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    client = Client(url + "/v1/", timeout_s=5)  # a trailing /v1 is tolerated
    job = client.submit({"model": {"id": "m"}, "prompts": ["hello"]})
    assert isinstance(job, Job) and (job.id, job.state) == ("new", "queued")
    assert job.spec["prompts"] == ["hello"]
    assert job.created_at is not None and job.created_at.tzinfo is not None

    from storage.jobs.spec import JobSpec

    typed = client.submit(JobSpec.model_validate({"model": {"id": "m"}, "prompts": "one prompt"}))
    assert typed.spec["prompts"] == ["one prompt"] and typed.spec["generation"]["max_new_tokens"] == 0

    got = client.get("abc")
    assert got.links["bundle"] == "/v1/jobs/abc/bundle" and not got.terminal
    page = client.list(state="running", limit=5)
    assert [j.id for j in page] == ["a", "b"] and page.next_cursor == "cursor-2" and len(page) == 2
    assert "GET /v1/jobs?limit=5&state=running" in fake.requests
    assert "cursor-2" in str(page) and "succeeded" in str(page)
    cancelled = client.cancel("abc")
    assert cancelled.cancel_requested and cancelled.state == "cancelling"


def test_job_renders_for_terminal_and_notebook(api: tuple[FakeApi, str]) -> None:
    _, url = api
    job = Client(url, timeout_s=5).get("failed")
    text = str(job)
    assert text.splitlines()[0] == "job failed"
    assert "state     failed" in text and "error     ModelLoadError: cannot load gguf: file truncated" in text
    html = job._repr_html_()
    assert "demo &lt;b&gt;" in html and "<b>" not in html.replace("<b>qkvault job</b>", "").replace(
        '<b style="color:#cf222e">', ""
    )


def test_wait_shows_progress_and_returns_final_job(api: tuple[FakeApi, str]) -> None:
    _, url = api
    out = io.StringIO()
    job = Client(url, timeout_s=5).wait("progress", poll_s=0.01, stream=out)
    assert job.succeeded and job.progress.chunks_written == 90
    lines = out.getvalue().splitlines()
    assert lines[0] == "[queued] waiting for a worker"
    assert lines[1] == "[running] prefill 12/60 units 20% 3.4 MB"  # printed once though polled twice
    assert lines[2] == "[running] decoding 48/60 units 80% 9.1 MB"
    assert lines[3] == "[succeeded] finalizing 60/60 units 100% 11.0 MB"
    assert len(lines) == 4


def test_wait_on_a_tty_rewrites_one_line(api: tuple[FakeApi, str]) -> None:
    _, url = api
    out = TtyBuffer()
    Client(url, timeout_s=5).wait("progress", poll_s=0.01, stream=out)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 4
    assert text.rstrip().endswith("[succeeded] finalizing 60/60 units 100% 11.0 MB")


def test_wait_raises_job_failed_with_the_server_error(api: tuple[FakeApi, str]) -> None:
    _, url = api
    with pytest.raises(JobFailed) as info:
        Client(url, timeout_s=5).wait("failed", poll_s=0.01, progress=False)
    err = info.value
    assert isinstance(err, QkvaultClientError)
    assert (err.type, err.title, err.detail, err.status) == (
        "model-load-failed",
        "ModelLoadError",
        "cannot load gguf: file truncated",
        422,
    )
    assert err.job is not None and err.job.state == "failed"
    assert str(err) == "job failed failed: ModelLoadError: cannot load gguf: file truncated"
    assert pickle.loads(pickle.dumps(err)).detail == err.detail


def test_wait_timeout(api: tuple[FakeApi, str]) -> None:
    _, url = api
    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"not finished after 0\.3 s") as info:
        Client(url, timeout_s=5).wait("forever", poll_s=0.05, timeout_s=0.3, progress=False)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, QkvaultClientError)
    assert time.monotonic() - start < 3


def test_download_is_atomic_and_opens(api: tuple[FakeApi, str], tmp_path: Path) -> None:
    fake, url = api
    client = Client(url, timeout_s=5)
    out = io.StringIO()
    (tmp_path / "dl").mkdir()
    path = client.download("done", tmp_path / "dl", stream=out)  # a directory: <id>.zarr.zip inside
    assert path == tmp_path / "dl" / "done.zarr.zip"
    assert path.read_bytes() == fake.bundle_zip
    assert not list((tmp_path / "dl").glob("*.partial"))
    assert out.getvalue().splitlines()[-1].startswith("[downloaded] ")

    with pytest.raises(QkvaultClientError) as info:
        client.download("running-job", tmp_path / "x.zip", progress=False)
    assert info.value.status == 409 and info.value.type == "bundle-not-ready"
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.partial").exists()

    ds = client.open("done", download_dir=tmp_path / "cache", progress=False)  # downloads once
    assert "attention" in ds and (tmp_path / "cache" / "done.zarr.zip").is_file()
    n_requests = len(fake.requests)
    ds2 = client.open("done", download_dir=tmp_path / "cache", progress=False)  # reuses the file
    assert len(fake.requests) == n_requests and ds2.attrs["format_version"] == "1.0"
    assert client.open(path).sizes["batch"] == 2  # a local path opens directly


def test_truncated_download_is_a_clear_error(api: tuple[FakeApi, str], tmp_path: Path) -> None:
    """A body shorter than its Content-Length: an error saying so (not "cannot reach the API"),
    and nothing left at the destination."""
    fake, url = api
    total = len(fake.bundle_zip)
    with pytest.raises(QkvaultClientError) as info:
        Client(url, timeout_s=5).download("short", tmp_path / "s.zip", progress=False)
    message = str(info.value)
    assert "ended early" in message and f"{total // 2} of {total} bytes" in message, message
    assert "cannot reach" not in message
    assert not (tmp_path / "s.zip").exists() and not (tmp_path / "s.zip.partial").exists()
