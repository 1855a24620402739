"""Database faults: which errors are transient, and the retry policy of the index's transactions.

A transient error (:func:`is_transient`) is one the same transaction may not meet a moment later:

- SQLite: ``database is locked`` / busy (another connection holds the write lock past the busy
  timeout), ``attempt to write a readonly database`` (the file was not writable when this
  connection opened it), ``disk I/O error``, ``database or disk is full`` (the index's disk: an
  operator frees space), ``unable to open database file``;
- PostgreSQL: no answer from the server (refused, reset, timed out), a connection SQLAlchemy found
  dead (``connection_invalidated``), SQLSTATE class 08 (connection exception), ``57P01``-``57P03``
  (shutdown, crash, "the database system is starting up"), ``53100`` (disk full), ``53300`` (too
  many connections),
  ``40001``/``40P01`` (serialization failure, deadlock) and ``25006`` (a read-only transaction:
  the server is a standby after a failover);
- a pool checkout that timed out.

Some of them also make the pooled connections suspect (:func:`discards_connections`): a SQLite
connection opened while the file was read-only stays read-only for good, and a PostgreSQL
connection may point at the old primary or a server that is going away. :func:`install` marks
those as disconnects (SQLAlchemy's ``handle_error`` event), so SQLAlchemy invalidates the
connection and every pooled connection older than the error; the next try opens a fresh one.

:func:`run_transaction` runs one whole transaction and, on a transient error, rolls it back and
runs it again from the start with exponential backoff until :attr:`IndexRetry.budget_s` has
passed, then raises :class:`~storage.errors.IndexUnavailable` (the API answers 503 with
``Retry-After``). A write whose COMMIT reached the database but whose acknowledgement was lost
runs again: every write of the index is idempotent under that, and :func:`retried` lets a write
recognise its own earlier commit (``Index.claim`` does not count the attempt twice).
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from storage.errors import IndexUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUDGET_S = 30.0
SQLITE_BUSY_TIMEOUT_S = 10.0  # longest one try waits on SQLite's write lock
ATTEMPT_KEY = "qkvault_attempt"  # Session.info: 1 on the first try of a transaction, 2 on its retry...
BUSY_OPTION = "qkvault_busy_ms"  # execution option: SQLite busy timeout of this transaction

# SQLite primary result codes: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
_SQLITE_TRANSIENT = frozenset({5, 6, 8, 10, 13, 14, 15})
_SQLITE_DISCARD = frozenset({8, 10, 14})  # the connection (or the file it opened) is suspect
_SQLITE_MESSAGES = {
    "database is locked": 5,
    "database table is locked": 6,
    "readonly database": 8,
    "disk i/o error": 10,
    "database or disk is full": 13,
    "unable to open database file": 14,
}
_PG_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "53100", "53300", "40001", "40P01", "25006"})
_PG_DISCARD = frozenset({"57P01", "57P02", "57P03", "25006"})


@dataclass(frozen=True)
class IndexRetry:
    """Retry a transaction that failed with a transient database error: backoff from
    ``first_delay_s`` doubling to ``max_delay_s`` (with jitter), for ``budget_s`` in all; then
    :class:`~storage.errors.IndexUnavailable`. ``sqlite_busy_s``: the longest one try waits on
    SQLite's write lock (never past the budget)."""

    budget_s: float = DEFAULT_BUDGET_S
    first_delay_s: float = 0.05
    max_delay_s: float = 2.0
    sqlite_busy_s: float = SQLITE_BUSY_TIMEOUT_S

    @property
    def retry_after_s(self) -> int:
        """What a client is told to wait (``Retry-After``): the budget, at least 1 s."""
        return max(1, math.ceil(self.budget_s))


@dataclass
class RetryStats:
    """What the retries of one ``Index`` did (thread-safe counters, for logs and tests)."""

    retried: int = 0  # transactions that needed more than one try
    failed_tries: int = 0  # tries that failed with a transient error
    unavailable: int = 0  # transactions given up (IndexUnavailable)
    discarded: int = 0  # failures that discarded the pool's connections
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)


def _sqlite_code(orig: BaseException) -> int | None:
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(orig).lower()
    return next((c for message, c in _SQLITE_MESSAGES.items() if message in text), None)


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying (module docstring); never one about the statement itself."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        return _sqlite_code(orig) in _SQLITE_TRANSIENT
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("08") or sqlstate in _PG_TRANSIENT
    # psycopg's OperationalError without a SQLSTATE: the server never answered (refused, reset)
    return type(orig).__name__ == "OperationalError"


def discards_connections(orig: BaseException | None) -> bool:
    """The error makes the pooled connections suspect: open new ones (module docstring)."""
    if orig is None:
        return False
    if isinstance(orig, sqlite3.Error):
        return _sqlite_code(orig) in _SQLITE_DISCARD
    return getattr(orig, "sqlstate", None) in _PG_DISCARD


def install(engine: Engine) -> None:
    """Treat :func:`discards_connections` errors as disconnects: SQLAlchemy then invalidates the
    connection and every pooled connection opened before the error."""

    @event.listens_for(engine, "handle_error")
    def _discard(context: Any) -> None:
        if not context.is_disconnect and discards_connections(context.original_exception):
            context.is_disconnect = True


def retried(session: Session) -> bool:
    """This transaction runs again after a try that failed, perhaps after its COMMIT landed."""
    return int(session.info.get(ATTEMPT_KEY, 1)) > 1


def run_transaction(
    engine: Engine,
    work: Callable[[Session], T],
    *,
    options: dict[str, Any],
    policy: IndexRetry,
    stats: RetryStats,
) -> T:
    """``work(session)`` in one transaction (committed when it returns), retried whole on a
    transient error within ``policy.budget_s``; then IndexUnavailable. ``options``: the session's
    execution options."""
    what = work.__qualname__.split(".<locals>")[0]
    start = time.monotonic()
    deadline = start + policy.budget_s
    delay = policy.first_delay_s
    tries = 0
    while True:
        tries += 1
        busy_s = max(0.05, min(policy.sqlite_busy_s, deadline - time.monotonic()))
        session = Session(
            engine,
            expire_on_commit=False,
            execution_options={**options, BUSY_OPTION: int(busy_s * 1000)},
            info={ATTEMPT_KEY: tries},
        )
        try:
            with session, session.begin():
                result = work(session)
        except Exception as exc:
            if not is_transient(exc):
                raise
            discarded = isinstance(exc, DBAPIError) and exc.connection_invalidated
            stats.count(failed_tries=1, retried=int(tries == 1), discarded=int(discarded))
            elapsed = time.monotonic() - start
            if elapsed >= policy.budget_s:
                stats.count(unavailable=1)
                raise _unavailable(what, exc, tries, elapsed, policy) from exc
            level = logging.WARNING if tries == 1 else logging.DEBUG
            log.log(
                level, "index: %s failed (%s); retrying for up to %g s", what, _short(exc), policy.budget_s
            )
            time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, policy.max_delay_s)
            continue
        if tries > 1:
            log.info("index: %s succeeded after %d tries in %.1f s", what, tries, time.monotonic() - start)
        return result


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {' '.join(str(orig).split())[:200]}"


def _unavailable(
    what: str, exc: BaseException, tries: int, elapsed: float, policy: IndexRetry
) -> IndexUnavailable:
    return IndexUnavailable(
        f"the index database is unavailable: {what} failed {tries} time{'s' if tries != 1 else ''} in "
        f"{elapsed:.1f} s (retry budget {policy.budget_s:g} s; QKVAULT_DB_RETRY_S): {_short(exc)}. "
        f"Try again in {policy.retry_after_s} s",
        detail={"tries": tries, "budget_s": policy.budget_s},
        retry_after_s=policy.retry_after_s,
    )
