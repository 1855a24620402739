"""Helpers of the fault tests (docs/reliability.md): compare bundles, check chunk rows, kill process
groups, a fault-injecting HTTP proxy in front of an S3 server, and a small disk (tmpfs) that fills up
or turns read-only.

Plain functions and classes (no pytest import), usable from tests and from ``python -m tests.soak``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.index import Index, JobRecord
from storage.stores.objectstore import ObjectStore

# Root attributes that differ between any two runs of the same job (wall-clock timings): the only
# thing bundle comparisons leave out.
VOLATILE_ATTRS = ("timings_s",)


def bundle_files(store: ObjectStore, url: str) -> dict[str, bytes]:
    """Every object of a bundle: relative path -> bytes."""
    return {rel: store.read_bytes(url, rel) for rel, _ in store.list_files(url)}


def _strip_volatile(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _strip_volatile(v) for k, v in doc.items() if k not in VOLATILE_ATTRS}
    if isinstance(doc, list):
        return [_strip_volatile(v) for v in doc]
    return doc


def bundle_differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """What differs between two bundles: missing or extra objects, chunks whose bytes differ, and
    metadata documents (``zarr.json``) that differ once :data:`VOLATILE_ATTRS` are left out."""
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        if got[key] == want[key]:
            continue
        if key.endswith("zarr.json"):
            a, b = _strip_volatile(json.loads(got[key])), _strip_volatile(json.loads(want[key]))
            if a != b:
                problems.append(f"metadata differs: {key} at {', '.join(_differing_paths(a, b)[:4])}")
            continue
        problems.append(f"bytes differ: {key}")
    return problems


def _differing_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ: ``path: got != want`` for the first values that differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}/{k}: only one side" for k in sorted(a.keys() ^ b.keys())]
        for k in sorted(a.keys() & b.keys()):
            found += _differing_paths(a[k], b[k], f"{path}/{k}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differing_paths(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


@dataclass
class ChunkAudit:
    """Chunk rows of a job checked against its stored objects."""

    rows: int
    missing_rows: list[str]  # chunk objects in the store without a row
    orphan_rows: list[str]  # rows whose object is not in the store
    bad_checksums: list[str]  # rows whose checksum/size disagree with the stored bytes
    duplicate_rows: int  # rows beyond one per key

    @property
    def clean(self) -> bool:
        return not (self.missing_rows or self.orphan_rows or self.bad_checksums or self.duplicate_rows)


def audit_chunks(index: Index, job: JobRecord, files: dict[str, bytes]) -> ChunkAudit:
    from storage.bundle.checksum import matches

    rows = index.list_chunks(job.id)
    keys = [r.key for r in rows]
    chunk_files = {k for k in files if "/c/" in k}
    bad = [
        r.key
        for r in rows
        if r.key in files and (not matches(files[r.key], r.checksum) or len(files[r.key]) != r.nbytes)
    ]
    return ChunkAudit(
        rows=len(rows),
        missing_rows=sorted(chunk_files - set(keys)),
        orphan_rows=sorted(set(keys) - chunk_files),
        bad_checksums=bad,
        duplicate_rows=len(keys) - len(set(keys)),
    )


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process and everything in its process group (a Celery worker: parent + pool child)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


# -- a fault-injecting HTTP proxy in front of an S3 server ----------------------------------------


@dataclass
class ProxyStats:
    forwarded: int = 0
    failed_5xx: int = 0
    dropped: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


class FaultyProxy:
    """HTTP proxy on 127.0.0.1:<free port> forwarding to ``upstream`` (an S3 endpoint).

    ``mode``: ``"ok"`` forwards; ``"5xx"`` answers every request ``503 SlowDown``-free
    ``ServiceUnavailable`` without forwarding; ``"down"`` closes each connection without an answer
    (the server disappeared); ``"denied"`` answers ``403 AccessDenied`` (a bucket policy that
    refuses the credentials).

    :meth:`schedule` sets the faults in the proxy itself instead, counted in requests: after a
    number of forwarded writes, each phase's mode for so many requests, then ``"ok"``. A test that
    sets ``mode`` from its own thread races the job (it may end before the fault comes); a
    schedule puts the fault mid-job whatever the machine's speed.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.mode = "ok"
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._writes_before_faults: int | None = None  # a schedule waiting for its writes
        self._phases: list[tuple[str, int | None]] = []  # (mode, requests left; None: for good)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                method = self.command
                mode = proxy._mode_for(method)
                faulty = mode != "ok"
                if faulty and mode == "down":
                    with proxy._lock:
                        proxy.stats.dropped += 1
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if faulty:
                    denied = mode == "denied"
                    with proxy._lock:
                        proxy.stats.failed_5xx += not denied
                    code = b"AccessDenied" if denied else b"ServiceUnavailable"
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code>"
                        b"<Message>injected fault</Message></Error>"
                    )
                    self.send_response(403 if denied else 503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.stats.forwarded += 1
                    proxy.stats.by_method[method] = proxy.stats.by_method.get(method, 0) + 1
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="faulty-proxy")

    def schedule(self, after_writes: int, phases: Sequence[tuple[str, int | None]]) -> None:
        """Once ``after_writes`` more writes (PUT/POST/DELETE) have been forwarded, answer in each
        phase's mode (``"5xx"``, ``"down"``, ``"denied"``) for its number of requests (``None``:
        for good), one phase after the other, then forward again."""
        if after_writes < 1 or not phases:
            raise ValueError("a schedule needs at least one write before its faults and one phase")
        with self._lock:
            self._writes_before_faults = after_writes
            self._phases = list(phases)

    def heal(self) -> None:
        """Forward every request again: the schedule dropped, ``mode`` back to ``"ok"``."""
        with self._lock:
            self._writes_before_faults, self._phases = None, []
            self.mode = "ok"

    def _mode_for(self, method: str) -> str:
        """How to answer one request: the schedule's phase once its writes are forwarded, else
        ``mode``."""
        write = method in ("PUT", "POST", "DELETE")
        with self._lock:
            if self._writes_before_faults is not None:
                if self._writes_before_faults > 0:  # the schedule's writes first, then its faults
                    self._writes_before_faults -= write
                    return "ok"
                self._writes_before_faults = None
            if not self._phases:
                return self.mode
            mode, left = self._phases[0]
            if left is not None:
                if left <= 1:
                    self._phases.pop(0)
                else:
                    self._phases[0] = (mode, left - 1)
            return mode

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- a Redis server that can be killed and restarted with its data (AOF, as in docker-compose.yml) --


class RestartableRedis:
    """``redis-server`` on a free loopback port with ``--appendonly yes --appendfsync everysec`` (the
    production settings of docker-compose.yml), its files in ``workdir``. :meth:`crash` SIGKILLs
    it; :meth:`start` brings it back on the same port with the same data."""

    def __init__(self, workdir: Any, binary: str | None = None) -> None:
        from pathlib import Path

        from qkvault.processes import free_port
        from tests.services import find_redis_server_binary

        self.binary = binary or find_redis_server_binary()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from qkvault.processes import spawn
        from tests.services import redis_ping

        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
        ]
        self.proc = spawn(args, self.workdir / "redis.log")
        if not wait_until(lambda: redis_ping(self.url), 15):
            raise RuntimeError(
                f"redis-server did not start on {self.port}: {(self.workdir / 'redis.log').read_text()}"
            )

    def crash(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def __enter__(self) -> RestartableRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.crash()


# -- a small disk for a store: a tmpfs that fills up and turns read-only ---------------------------


class Tmpfs:
    """A tmpfs of ``size_bytes`` mounted at ``path`` while the ``with`` block runs: a store disk
    that :meth:`fill` fills up, :meth:`free` frees and :meth:`remount` makes read-only or writable
    again. Mounting needs root (CAP_SYS_ADMIN); :meth:`unavailable` says why it cannot here."""

    FILLER = ".filler"

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.size_bytes = size_bytes

    @classmethod
    @contextlib.contextmanager
    def mounted_or_skip(cls, tmp_path_factory: Any, size_bytes: int) -> Iterator[Tmpfs]:
        """A module fixture's disk: a tmpfs of ``size_bytes`` under a new temporary directory, or
        the test skipped with the reason it cannot be mounted here."""
        import pytest

        root = tmp_path_factory.mktemp("tmpfs")
        reason = cls.unavailable(root / "probe")
        if reason is not None:
            pytest.skip(f"needs a tmpfs: {reason}")
        with cls(root / "disk", size_bytes) as disk:
            yield disk

    @staticmethod
    def unavailable(probe_dir: Path) -> str | None:
        """Why a tmpfs cannot be mounted here (None when it can): tries one at ``probe_dir``."""
        if os.geteuid() != 0:
            return f"mounting a tmpfs needs root (CAP_SYS_ADMIN); the test runs as uid {os.geteuid()}"
        probe = Tmpfs(probe_dir, 1 << 16)
        try:
            with probe:
                pass
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"mount -t tmpfs is not permitted here: {getattr(exc, 'stderr', '') or exc}"
        return None

    def _mount(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True, capture_output=True, text=True, timeout=30)

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "qkvault-test", str(self.path))
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True, timeout=30)

    def remount(self, *, read_only: bool, timeout_s: float = 10.0) -> None:
        """Remount read-only or read-write. A read-only remount is refused (busy) while a file is
        open for writing: it is tried again until ``timeout_s``."""
        mode = "ro" if read_only else "rw"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._mount("-o", f"remount,{mode}", str(self.path))
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave_bytes: int = 0) -> None:
        """Take every free byte but ``leave_bytes`` with one file (:meth:`free` deletes it)."""
        filler = self.path / self.FILLER
        taken = filler.stat().st_size if filler.exists() else 0
        more = self.free_bytes() - leave_bytes
        if more > 0:
            with open(filler, "ab") as f:
                os.posix_fallocate(f.fileno(), taken, more)

    def free(self) -> None:
        (self.path / self.FILLER).unlink(missing_ok=True)
