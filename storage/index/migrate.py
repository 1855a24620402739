"""Programmatic Alembic migrations for the index (``Index.migrate()`` and the ``alembic`` CLI).

Operators can also run ``QKVAULT_DATABASE_URL=... alembic -c storage/index/alembic.ini upgrade head``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text

from storage.index.engine import WRITE_OPTION

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key that serialises concurrent migrations ("qkvm" in ASCII)
PG_MIGRATION_LOCK = 0x716B766D


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged migrations, bound to ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def migration_connection(engine: Engine, schema: str | None = None) -> Iterator[Connection]:
    """A connection in a transaction that holds the migration lock, committed on exit.

    PostgreSQL: a transaction-scoped advisory lock, then ``CREATE SCHEMA IF NOT EXISTS`` for
    ``schema``. SQLite: ``BEGIN IMMEDIATE`` (DDL is transactional there too). Concurrent callers
    wait for each other; the later ones find the schema current and do nothing.
    """
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
                if schema is not None:
                    # schema was validated as a plain identifier by engine.prepare_url
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            yield conn


def upgrade(engine: Engine, *, schema: str | None = None, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` on ``engine`` (a no-op when already there)."""
    with migration_connection(engine, schema) as conn:
        command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def main(argv: list[str] | None = None) -> int:
    """``python -m storage.index.migrate``: bring the index at ``--database-url`` (default:
    ``QKVAULT_DATABASE_URL``) to the newest schema; with ``--api-key-file``, also make sure a valid
    API key of ``--owner`` is in that file (the embedded stack's local key)."""
    import argparse

    from storage.index.apikeys import ApiKeys
    from storage.index.repo import Index
    from storage.settings import ServiceSettings

    parser = argparse.ArgumentParser(prog="python -m storage.index.migrate", description=main.__doc__)
    parser.add_argument("--database-url", default=None, help="default: QKVAULT_DATABASE_URL")
    parser.add_argument("--api-key-file", type=Path, default=None, help="keep a valid API key in this file")
    parser.add_argument("--owner", default="local", help="owner of that key")
    args = parser.parse_args(argv)
    index = Index(args.database_url or ServiceSettings().database_url)
    try:
        index.migrate()
        if args.api_key_file is not None:  # reused while valid, else created
            ApiKeys(index).ensure_key_file(args.api_key_file, owner=args.owner)
    finally:
        index.dispose()
    print(f"index at {current_revision(index.engine) or 'no revision'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
