"""Helpers of the database fault tests (docs/reliability.md, "Database faults"): another connection
holding SQLite's write lock, a database file that cannot be opened for writing, COMMITs whose
acknowledgement is lost, and a PostgreSQL server of the test's own that it stops and starts again.

Plain code (no pytest import), like ``tests/faults.py``. PostgreSQL refuses to run as root: as root
the private server runs as the ``postgres`` user (``runuser``), in a directory under the system
temp folder that user may enter.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from qkvault.processes import free_port

PG_USER = "postgres"


@contextlib.contextmanager
def write_lock(db: Path, hold_s: float | None = None) -> Iterator[sqlite3.Connection]:
    """Another connection takes SQLite's write lock (``BEGIN IMMEDIATE``) and holds it while the
    block runs (or for ``hold_s``, then a timer releases it)."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(hold_s or 0, conn.rollback)
    if hold_s is not None:
        timer.start()
    try:
        yield conn
    finally:
        if hold_s is not None:
            timer.join()
        if conn.in_transaction:
            conn.rollback()
        conn.close()


def _chattr(flag: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True, timeout=30)


def read_only_unavailable(probe_dir: Path) -> str | None:
    """Why a file cannot be made read-only here (None when it can): ``chattr +i`` on a probe file."""
    if shutil.which("chattr") is None:
        return "chattr is missing"
    probe = probe_dir / ".qk-chattr-probe"
    probe.write_bytes(b"")
    try:
        done = _chattr("+i", probe)
        if done.returncode != 0:
            return f"chattr +i is not permitted on {probe_dir}: {done.stderr.strip()}"
        _chattr("-i", probe)
        return None
    finally:
        probe.unlink(missing_ok=True)


@contextlib.contextmanager
def read_only_file(db: Path) -> Iterator[None]:
    """The database file cannot be opened for writing while the block runs (``chattr +i``: as root,
    permission bits stop no open). A connection opened meanwhile gets the file read-only, as SQLite
    does when its read-write open fails, and keeps it so; connections opened before write on."""
    done = _chattr("+i", db)
    if done.returncode != 0:
        raise RuntimeError(f"chattr +i {db}: {done.stderr.strip()}")
    try:
        yield
    finally:
        _chattr("-i", db).check_returncode()


@contextlib.contextmanager
def lost_commit_acknowledgements(times: int = 1) -> Iterator[list[int]]:
    """The next ``times`` COMMITs of any session reach the database, then the connection drops
    before their answer (an OperationalError that invalidated the connection)."""
    left = [times]

    def after_commit(session: Session) -> None:
        if left[0] > 0:
            left[0] -= 1
            reason = Exception("server closed the connection unexpectedly")
            raise OperationalError("COMMIT", None, reason, connection_invalidated=True)

    event.listen(Session, "after_commit", after_commit)
    try:
        yield left
    finally:
        event.remove(Session, "after_commit", after_commit)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class RestartablePostgres:
    """``initdb`` + ``pg_ctl start`` on 127.0.0.1:<free port> while the ``with`` block runs.
    :meth:`stop` is ``pg_ctl stop -m fast`` (open sessions are terminated, as in a restart or a
    failover); :meth:`start` brings the server back on the same port with the same data."""

    def __init__(self) -> None:
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("initdb/pg_ctl not found (PATH, /usr/lib/postgresql/*/bin)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.port = free_port()
        self.url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/postgres"
        self.root = Path(tempfile.mkdtemp(prefix="qk-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._run_as = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []

    @staticmethod
    def unavailable() -> str | None:
        """Why a private server cannot run here (None when it can)."""
        if _binary("initdb") is None or _binary("pg_ctl") is None:
            return "initdb/pg_ctl not found (PATH, /usr/lib/postgresql/*/bin)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
            if shutil.which("runuser") is None:
                return "running as root and runuser is missing"
        return None

    def _run(self, *args: str, timeout_s: float = 60.0) -> None:
        done = subprocess.run([*self._run_as, *args], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr or done.stdout}\n{log}")

    def __enter__(self) -> RestartablePostgres:
        if self._run_as:
            user = pwd.getpwnam(PG_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync", "-E", "UTF8")
        self.start()
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c max_connections=50"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start"
        )

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            [*self._run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)
