"""One index database in one process: its engine, created on first use and replaced after a fork,
and its transactions, retried whole after transient database errors (storage/index/retry.py).

:class:`~storage.index.repo.Index` (jobs and chunks) builds on it; :mod:`storage.index.submit`,
:mod:`storage.index.apikeys` and :mod:`storage.index.reconcile` run their transactions through
:meth:`Database.transact` too, so every query of the index gets the same retry policy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from storage.index.engine import WRITE_OPTION, create_index_engine, prepare_url
from storage.index.retry import IndexRetry, RetryStats, run_transaction

T = TypeVar("T")


class Database:
    """The engine and transactions of one index database (see :class:`~storage.index.repo.Index`
    for the arguments). ``retry``: how long a transaction is retried after transient database
    errors (the deployable's ``db_retry_s``); ``retry_stats`` counts what the retries did."""

    def __init__(
        self, database_url: str, *, schema: str | None = None, retry: IndexRetry | None = None
    ) -> None:
        prepare_url(database_url, schema)  # fail fast on a bad URL; no connection yet
        self.database_url = database_url
        self.schema = schema
        self.retry = retry if retry is not None else IndexRetry()
        self.retry_stats = RetryStats()
        self._engine: Engine | None = None
        self._pid = os.getpid()
        self._engine_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine, created on first use; after a fork the child gets a fresh connection pool."""
        engine, pid = self._engine, os.getpid()
        if engine is not None and self._pid == pid:
            return engine
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_index_engine(self.database_url, self.schema)
            elif self._pid != pid:
                # inherited through fork (Celery prefork): never touch the parent's connections
                self._engine.dispose(close=False)
            self._pid = pid
            return self._engine

    def migrate(self) -> None:
        """Bring the schema to the newest revision (``alembic upgrade head``); a no-op when current."""
        from storage.index.migrate import upgrade

        upgrade(self.engine, schema=self.schema)

    def dispose(self) -> None:
        """Close pooled connections; the next call opens new ones."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def transact(self, work: Callable[[Session], T], *, write: bool = False) -> T:
        """``work(session)`` in one transaction, committed when it returns; ``write``: it writes
        (SQLite: ``BEGIN IMMEDIATE``). After a transient database error the whole transaction runs
        again, with backoff, for ``retry.budget_s``; then IndexUnavailable. So ``work`` must be
        safe to run again after a COMMIT whose acknowledgement was lost
        (:func:`storage.index.retry.retried` tells a retry)."""
        options = {WRITE_OPTION: True} if write else {}
        return run_transaction(self.engine, work, options=options, policy=self.retry, stats=self.retry_stats)
