"""Engine construction for the index: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL.

SQLite notes: Python's sqlite3 driver does not BEGIN before SELECT or DDL, so SQLAlchemy takes over
transaction control (the recipe from SQLAlchemy's SQLite docs). A connection carrying the
``WRITE_OPTION`` execution option begins with ``BEGIN IMMEDIATE``: it takes the write lock up front,
so a read-then-write transaction never fails half-way with ``SQLITE_BUSY`` and concurrent writers
queue on ``busy_timeout`` instead; each transaction of the index sets its own busy timeout
(``BUSY_OPTION``: what is left of its retry budget, at most 10 s). On PostgreSQL, writers lock rows
with ``SELECT ... FOR UPDATE``, and a connection attempt gives up after ``PG_CONNECT_TIMEOUT_S``.

Both: pooled connections are pinged before use (``pool_pre_ping``), and the errors that make them
suspect (a SQLite file that was read-only when a connection opened it, a PostgreSQL server going
away or turned standby) discard the pool's connections (:func:`storage.index.retry.install`).
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from storage.index.retry import BUSY_OPTION, SQLITE_BUSY_TIMEOUT_S, install

WRITE_OPTION = "qkvault_write"  # execution option: this transaction will write
SQLITE_BUSY_TIMEOUT_MS = int(SQLITE_BUSY_TIMEOUT_S * 1000)  # a connection's default
PG_CONNECT_TIMEOUT_S = 5  # libpq connect_timeout unless the URL sets one
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SEARCH_PATH_RE = re.compile(r"-c\s*search_path=\S*")


def prepare_url(database_url: str | URL, schema: str | None = None) -> tuple[URL, dict[str, Any]]:
    """Validate the URL and schema; return the URL and the driver connect args.

    ``schema`` (PostgreSQL only) becomes the connection's ``search_path`` through the libpq
    ``options`` parameter; it replaces a search_path in the URL's ``?options=`` and keeps the rest.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"unsupported index database {url.render_as_string(hide_password=True)!r}: "
            "use sqlite:///path/to/index.db or postgresql+psycopg://user@host/db"
        )
    if schema is None:
        return url, {}
    if backend != "postgresql":
        raise ValueError(f"schema={schema!r} is only supported on PostgreSQL, not {backend}")
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(f"invalid schema name {schema!r}: use letters, digits and '_' (max 63)")
    existing = url.query.get("options", "")
    if isinstance(existing, tuple):
        existing = " ".join(existing)
    options = f"{_SEARCH_PATH_RE.sub('', existing).strip()} -csearch_path={schema}".strip()
    return url.difference_update_query(["options"]), {"options": options}


def create_index_engine(database_url: str | URL, schema: str | None = None) -> Engine:
    """Create the engine (no connection is opened until first use)."""
    url, connect_args = prepare_url(database_url, schema)
    if url.get_backend_name() == "postgresql":
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        install(engine)
        return engine
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    install(engine)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (_sqlite_on_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch the database file to WAL, waiting out other connections' locks.

    The switch needs an exclusive lock, and SQLite reports ``database is locked`` at once (without
    calling the busy handler) when another connection is mid-transaction on a fresh, not-yet-WAL
    file, e.g. several processes migrating a new index together. So retry until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay_s = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.2)


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    busy_ms = int(options.get(BUSY_OPTION, SQLITE_BUSY_TIMEOUT_MS))
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {busy_ms}")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE_OPTION, False) else "BEGIN")
