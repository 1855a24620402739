"""Child-process plumbing for the embedded stack: free ports, logs, process groups, clean stops.

Each child runs in its own process group (a terminal's Ctrl-C reaches only the parent, which stops
the children in order), dies with the parent on Linux (``PR_SET_PDEATHSIG``), and is stopped with
SIGTERM, then SIGKILL to its whole group after a grace period, so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now. Probed as uvicorn and Redis bind, with
    ``SO_REUSEADDR``: the connections of a server just stopped leave their end in TIME-WAIT on its
    port for about a minute, which would refuse a plain bind but not the server; a port that some
    socket listens on is refused either way (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let the probe bind a port in use
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, indented, for error messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 64 * 1024, 0))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"    (no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else f"    ({path} is empty)"


def rotate_log(log_path: Path) -> None:
    """Keep the previous run's log as ``<name>.1`` so readiness checks read only this run."""
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))


def _die_with_parent_fn() -> Callable[[], None] | None:
    """``preexec_fn`` making a child die with this process (Linux), or None elsewhere.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only armed from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # resolved before fork: the child only calls it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def spawn(
    args: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            process_group=0,
            preexec_fn=_die_with_parent_fn(),
        )


def exited(proc: subprocess.Popen[Any]) -> bool:
    """Has ``proc`` exited? Does not reap it, so its pid (and process group id) stay reserved."""
    if proc.returncode is not None:
        return True
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return proc.poll() is not None
    return proc.poll() is not None


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the process group led by ``proc`` (to ``proc`` alone where groups do not exist)."""
    if proc.returncode is not None:  # reaped: its id may belong to someone else now
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0, *, sigterm: bool = True) -> int | None:
    """SIGTERM the process group of ``proc``; SIGKILL what is left of the group after ``grace_s``.

    The leader is reaped last, so the group id cannot be reused by an unrelated process meanwhile.
    ``sigterm=False`` when the caller already sent it. Returns the exit code.
    """
    if proc.returncode is not None:
        return proc.returncode
    if sigterm:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not exited(proc):
        time.sleep(0.05)
    # the rest of the group too (e.g. a worker's pool children), even when the leader exited cleanly
    signal_group(proc, signal.SIGKILL if hasattr(os, "killpg") else signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)
