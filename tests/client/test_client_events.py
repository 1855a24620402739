"""The client and the CLI following a job's live events (``GET /v1/jobs/{id}/events``).

Against the real API under uvicorn (SQLite index; job changes written through the index as the
worker writes them): ``Client.events`` yields each change, ``Client.wait`` and ``qkvault wait``
follow the stream (not polling: they return long before one poll interval), and fall back to
polling when the server has no such route. Against a small real HTTP server (http.server) that
misbehaves on purpose: a stream that breaks is reopened, one that keeps breaking is given up for
polling, and a download cut short fails the CLI with a clear message and nothing kept."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from api.routes import events
from api.settings import ApiSettings
from qkvault.cli import main
from qkvault.client import Client
from qkvault.events import EventsUnavailable
from storage.index import Index, JobState
from storage.index.apikeys import ApiKeys
from tests.api.sse_support import serve, store_job

OWNER = "follower"
WORKER = "worker-1"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(f"sqlite:///{tmp_path / 'index.db'}")
    idx.migrate()
    yield idx
    idx.dispose()


@pytest.fixture
def settings(tmp_path: Path, index: Index) -> ApiSettings:
    return ApiSettings(
        database_url=str(index.engine.url),
        store_url=str(tmp_path / "store"),
        migrate_on_startup=False,
        events_poll_s=0.05,
    )


@pytest.fixture
def secret(index: Index) -> str:
    key, _ = ApiKeys(index).create(owner=OWNER, label="test")
    return key


def run_job_later(
    index: Index, job_id: str, *, step_s: float = 0.25, after: threading.Event | None = None
) -> threading.Thread:
    """A worker's writes, one every ``step_s``: claim, two progress reports, success; ``after``: not
    before it is set (the client has seen the queued job: on a loaded machine its first request can
    take longer than a step)."""

    def work() -> None:
        if after is not None:
            after.wait(10)
        steps: list[Callable[[], object]] = [
            lambda: index.claim(job_id, WORKER),
            lambda: index.update_progress(
                job_id, units_done=3, units_total=10, phase="prefill", worker=WORKER
            ),
            lambda: index.update_progress(job_id, units_done=8, phase="decoding", worker=WORKER),
            lambda: index.finish(job_id, JobState.SUCCEEDED, worker=WORKER),
        ]
        for step in steps:
            time.sleep(step_s)
            step()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


class Progress(io.StringIO):
    """A client's progress stream; ``written`` is set by its first line."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self.written.set()
        return count


def test_events_and_wait_follow_the_stream(settings: ApiSettings, index: Index, secret: str) -> None:
    with serve(create_app(settings)) as base_url, Client(base_url, api_key=secret, timeout_s=10) as client:
        job = store_job(index, OWNER, settings.store_url)
        first = threading.Event()
        worker = run_job_later(index, job.id, after=first)
        seen = []
        for j in client.events(job.id):
            seen.append((j.state, j.phase, j.progress.units_done))
            first.set()
        worker.join()
        assert seen == [
            ("queued", None, 0),
            ("running", None, 0),
            ("running", "prefill", 3),
            ("running", "decoding", 8),
            ("succeeded", "decoding", 8),
        ]

        job = store_job(index, OWNER, settings.store_url)
        out = Progress()
        worker = run_job_later(index, job.id, after=out.written)
        start = time.monotonic()
        done = client.wait(job.id, poll_s=60, stream=out)  # polling would not look again for 60 s
        waited_s = time.monotonic() - start
        worker.join()
    assert done.state == "succeeded" and waited_s < 10, waited_s
    lines = out.getvalue().splitlines()
    assert lines[0] == "[queued] waiting for a worker", lines
    assert "[running] prefill 3/10 units 30%" in lines and "[running] decoding 8/10 units 80%" in lines
    assert lines[-1].startswith("[succeeded] decoding 8/10 units"), lines


def test_wait_falls_back_to_polling_on_a_server_without_events(
    settings: ApiSettings, index: Index, secret: str
) -> None:
    app = create_app(settings)  # as an older server: no events route
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "original_router", None) is not events.router
    ]
    with serve(app) as base_url, Client(base_url, api_key=secret, timeout_s=10) as client:
        job = store_job(index, OWNER, settings.store_url)
        with pytest.raises(EventsUnavailable) as info:
            next(iter(client.events(job.id)))
        assert info.value.status == 404

        out = Progress()
        worker = run_job_later(index, job.id, step_s=0.1, after=out.written)
        done = client.wait(job.id, poll_s=0.05, stream=out)
        worker.join()
    assert done.state == "succeeded"
    assert out.getvalue().splitlines()[0] == "[queued] waiting for a worker"
    assert "[running] prefill 3/10 units 30%" in out.getvalue()


def test_cli_wait_shows_the_progress_of_the_events(
    settings: ApiSettings, index: Index, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(create_app(settings)) as base_url:
        job = store_job(index, OWNER, settings.store_url)
        worker = run_job_later(index, job.id)
        start = time.monotonic()
        assert main(["--api", base_url, "--api-key", secret, "wait", job.id]) == 0
        assert time.monotonic() - start < 10
        worker.join()
        captured = capsys.readouterr()
        assert "[running] prefill 3/10 units 30%" in captured.err.splitlines(), captured.err
        assert f"job {job.id}" in captured.out and "succeeded" in captured.out

        assert main(["--api", base_url, "--api-key", secret, "wait", job.id, "--poll"]) == 0
        assert "[succeeded]" in capsys.readouterr().err


# -- a server that misbehaves on purpose ----------------------------------------------------------
NOW = "2026-01-02T03:04:05+00:00"
ZIP_BYTES = b"PK\x03\x04" + bytes(range(256)) * (12 << 10)  # 3 MiB; cut in half by /short/bundle


def doc(job_id: str, state: str) -> str:
    return json.dumps({"id": job_id, "state": state, "created_at": NOW, "updated_at": NOW})


class Flaky:
    """What the fake server answers: ``streams[job]`` is the body of each successive stream of a
    job (the last one repeats); every stream ends by hanging up."""

    def __init__(self) -> None:
        self.streams: dict[str, list[str]] = {
            # queued, then the connection breaks; running, breaks again; then the end
            "flaky": [
                f"retry: 20\n\nevent: job\ndata: {doc('flaky', 'queued')}\n\n",
                f"event: job\ndata: {doc('flaky', 'running')}\n\n",
                f"event: job\ndata: {doc('flaky', 'succeeded')}\n\n"
                f"event: end\ndata: {doc('flaky', 'succeeded')}\n\n",
            ],
            "broken": [": nothing to say\nretry: 20\n\n"],  # never a job: given up, then polled
        }
        self.requests: list[str] = []


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    state = Flaky()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            parts = self.path.strip("/").split("/")  # v1 jobs <id> [events|bundle]
            if parts[-1] == "events":
                bodies = state.streams[parts[2]]
                n = sum(1 for r in state.requests if r == self.path)
                body = bodies[min(n, len(bodies)) - 1].encode()
                self._head(200, "text/event-stream", None)
                self.wfile.write(body)
            elif parts[-1] == "bundle":  # declares the whole zip, sends half of it
                self._head(200, "application/zip", len(ZIP_BYTES))
                self.wfile.write(ZIP_BYTES[: len(ZIP_BYTES) // 2])
            else:
                data = doc(parts[2], "succeeded").encode()
                self._head(200, "application/json", len(data))
                self.wfile.write(data)
            self.wfile.flush()
            self.close_connection = True

        def _head(self, status: int, ctype: str, length: int | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.send_header("Connection", "close")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_broken_stream_is_reopened_and_one_that_stays_broken_is_polled(flaky: tuple[Flaky, str]) -> None:
    state, url = flaky
    with Client(url, timeout_s=5) as client:
        assert [j.state for j in client.events("flaky")] == ["queued", "running", "succeeded"]
        assert state.requests.count("/v1/jobs/flaky/events") == 3

        done = client.wait("broken", poll_s=0.05, progress=False)
    assert done.state == "succeeded"
    assert state.requests.count("/v1/jobs/broken/events") == 4  # the first try and 3 reconnections
    assert state.requests[-1] == "/v1/jobs/broken"  # then one poll, which found it finished


def test_cli_download_cut_short_fails_and_keeps_nothing(
    flaky: tuple[Flaky, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = flaky
    dest = tmp_path / "short.zip"
    assert main(["--api", url, "download", "short", "-o", str(dest)]) == 1
    err = capsys.readouterr().err
    half = len(ZIP_BYTES) // 2
    assert f"received {half} of {len(ZIP_BYTES)} bytes" in err and "ended early" in err, err
    assert "[downloading] 1.0 MB / 3.1 MB 33%" in err  # the first 1 MiB piece, against Content-Length
    assert not dest.exists() and not (tmp_path / "short.zip.partial").exists()
