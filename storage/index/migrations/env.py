"""Alembic environment for the qkvault index.

Programmatic runs (``storage.index.migrate``) pass an open connection in
``config.attributes["connection"]``. CLI runs take the URL from ``-x url=...``, else the
environment variable ``QKVAULT_DATABASE_URL``, else ``sqlalchemy.url`` in alembic.ini.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from storage.index.engine import create_index_engine
from storage.index.migrate import migration_connection
from storage.index.models import Base
from storage.settings import ServiceSettings

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        settings = ServiceSettings()  # QKVAULT_DATABASE_URL only when set: not the class's default
        explicit = "database_url" in settings.model_fields_set
        url = settings.database_url if explicit else config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no database URL for the qkvault index: set QKVAULT_DATABASE_URL "
            "(e.g. sqlite:///.qkvault/index.db or postgresql+psycopg://user@host/db) or pass -x url=..."
        )
    return url


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = create_index_engine(database_url())
    try:
        with migration_connection(engine) as conn:
            run_migrations(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
