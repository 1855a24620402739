"""Helpers of the event-stream tests (API and client): the app under uvicorn in this process, a
reader of one ``text/event-stream`` response in a thread (messages with their arrival time), and a
job stored through the real index as ``POST /v1/jobs`` would store it."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI

from qkvault.processes import free_port
from qkvault.sse import SseMessage, SseParser
from storage.index import Index, JobRecord
from tests.api.support import SMOLLM2


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """``app`` under uvicorn in a thread of this process (HTTP as deployed, state visible to the
    test): its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def store_job(index: Index, owner: str, store_root: str) -> JobRecord:
    """A queued job in the index (what ``POST /v1/jobs`` stores; nothing is enqueued)."""
    return index.create_job(
        spec={"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]},
        owner=owner,
        store_url_for=lambda job_id: f"{store_root}/{job_id}.zarr",
        max_attempts=3,
    )


@dataclass
class EventStream:
    """One streaming ``GET`` read by a thread: ``lines`` as they came, messages queued with the
    ``time.monotonic()`` of their arrival; ``closed`` is set when the server ended the body."""

    response: httpx.Response
    lines: list[str] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    parser: SseParser = field(default_factory=SseParser)
    _queue: queue.Queue[tuple[float, SseMessage]] = field(default_factory=queue.Queue)

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                self.lines.append(line)
                message = self.parser.line(line)
                if message is not None:
                    self._queue.put((time.monotonic(), message))
        except httpx.HTTPError:
            pass  # the test closed the response
        finally:
            self.closed.set()

    def next(self, timeout_s: float = 5.0) -> tuple[float, SseMessage]:
        """The next message and when it arrived (AssertionError after ``timeout_s``)."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout_s} s; lines so far: {self.lines}") from None

    def pending(self) -> int:
        return self._queue.qsize()


@contextlib.contextmanager
def open_events(base_url: str, job_id: str, headers: dict[str, str]) -> Iterator[EventStream]:
    """``GET /v1/jobs/{id}/events`` read in a thread; the connection is closed on exit."""
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=10) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events") as response,
    ):
        stream = EventStream(response)
        reader = threading.Thread(target=stream._read, daemon=True)
        reader.start()
        try:
            yield stream
        finally:
            hang_up(response)
            reader.join(timeout=5)


def hang_up(response: httpx.Response) -> None:
    """Close the connection under a response another thread is reading: shut the socket down
    (the server sees the client leave at once; closing alone would wait for that thread's read)."""
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    response.close()
